"""Task bodies are untrusted: render markdown, then sanitise the HTML with an allow-list."""

from __future__ import annotations

import re
from urllib.parse import urlsplit

import nh3
from django.utils.html import escape
from django.utils.safestring import SafeString, mark_safe
from markdown_it import MarkdownIt
from mdit_py_plugins.tasklists import tasklists_plugin

# Browsers drop tabs and newlines inside a URL and read a backslash as a slash: a src of
# slash, backslash, "tracker.example/p.gif" still loads from another host.
_URL_NOISE = re.compile(r"[\x00-\x20\x7f]")


def is_same_origin(url: str) -> bool:
    """A relative URL (a path on this site); anything naming a scheme or a host is not."""
    url = _URL_NOISE.sub("", url).replace("\\", "/")
    parts = urlsplit(url)
    return not (parts.scheme or parts.netloc or url.startswith("//"))


def _render_image(self, tokens, idx, options, env) -> str:
    # An image from another host would load as soon as the drawer opens (a tracking pixel,
    # or a probe of who reads the task): it becomes a link a person may choose to follow.
    token = tokens[idx]
    src = str(token.attrGet("src") or "")
    if is_same_origin(src):
        return self.image(tokens, idx, options, env)
    text = self.renderInlineAsText(token.children or [], options, env) or src
    return f'<a href="{escape(src)}">{escape(text)}</a>'


# Raw HTML in a task file is shown as text, never passed through; nh3 is the second wall.
# Checklists (`- [ ] step`) become disabled checkboxes, each inside its own label.
_markdown = (
    MarkdownIt("commonmark", {"html": False, "linkify": False})
    .enable(["table", "strikethrough"])
    .use(tasklists_plugin, label=True)
)
_markdown.add_render_rule("image", _render_image)

ALLOWED_TAGS = {
    "a", "abbr", "b", "blockquote", "br", "code", "del", "em", "h1", "h2", "h3", "h4",
    "h5", "h6", "hr", "i", "img", "input", "label", "li", "ol", "p", "pre", "s", "strong",
    "sub", "sup", "table", "tbody", "td", "th", "thead", "tr", "ul",
}  # fmt: skip
ALLOWED_ATTRIBUTES = {
    "a": {"href", "title"},
    "img": {"src", "alt", "title"},
    "th": {"align"},
    "td": {"align"},
    "code": {"class"},
    "ol": {"start"},
}
# Only the checklist's own markup: a checkbox that cannot be changed, and its classes.
ATTRIBUTE_VALUES = {
    "input": {
        "type": {"checkbox"},
        "checked": {"checked"},
        "class": {"task-list-item-checkbox"},
    },
    "li": {"class": {"task-list-item"}},
    "ul": {"class": {"contains-task-list"}},
}
FORCED_ATTRIBUTES = {"input": {"type": "checkbox", "disabled": "disabled"}}
# No javascript:, data:, vbscript: or any other scheme that can carry code.
URL_SCHEMES = {"http", "https", "mailto"}


def _keep_attribute(tag: str, attribute: str, value: str) -> str | None:
    # The second wall for images: whatever made it, an <img> never loads from another host.
    if tag == "img" and attribute == "src" and not is_same_origin(value):
        return None
    return value


def render_markdown(text: str) -> SafeString:
    html = _markdown.render(text or "")
    clean = nh3.clean(
        html,
        tags=ALLOWED_TAGS,
        attributes=ALLOWED_ATTRIBUTES,
        tag_attribute_values=ATTRIBUTE_VALUES,
        set_tag_attribute_values=FORCED_ATTRIBUTES,
        url_schemes=URL_SCHEMES,
        link_rel="noopener noreferrer nofollow",
        attribute_filter=_keep_attribute,
        strip_comments=True,
    )
    return mark_safe(clean)  # noqa: S308 - sanitised by nh3 just above
