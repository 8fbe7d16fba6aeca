"""Local stand-ins of the agent vendors' HTTP APIs, for running the real CLIs offline."""
