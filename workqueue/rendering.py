"""Task bodies are untrusted: render markdown, then sanitise the HTML with an allow-list."""

from __future__ import annotations

import hashlib
import re
from urllib.parse import urlsplit

import nh3
from django.core.cache import cache
from django.utils.html import escape, format_html
from django.utils.safestring import SafeString, mark_safe
from markdown_it import MarkdownIt
from markdown_it.rules_core import StateCore
from markdown_it.token import Token

# Characters of a body rendered as markdown. markdown-it runs at 1-14 µs a character
# (`![` repeated is the slowest), so a crafted 1 MB body held a request for 14 s; past
# this the body is shown as written, escaped, which costs nothing.
RENDER_LIMIT = 64 * 1024
# Bodies this long are rendered once and kept (a few milliseconds and more each); shorter
# ones would only crowd the board's kept counts and searches out of the cache.
KEPT_FROM = 8 * 1024
KEPT_SECONDS = 3600
RENDERING = 1  # raise it when the rendering or the sanitising changes

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


_CHECKBOX = re.compile(r"\[([ xX])\][ \t\n\v\f\r]+")
_LIST_OPEN = ("bullet_list_open", "ordered_list_open")
_LIST_CLOSE = ("bullet_list_close", "ordered_list_close")


def _checklists(state: StateCore) -> None:
    """`- [ ] step` items become disabled checkboxes, each inside its own label, as GitHub
    shows them. (mdit-py-plugins' tasklists does the same but finds each item's list by
    walking back over every token before it: a 1 MiB body of such lines took minutes.)"""
    tokens, lists = state.tokens, []
    for i, token in enumerate(tokens):
        if token.type in _LIST_OPEN:
            lists.append(token)
        elif token.type in _LIST_CLOSE:
            lists.pop()
        elif (
            token.type == "inline"
            and i >= 2
            and tokens[i - 1].type == "paragraph_open"
            and tokens[i - 2].type == "list_item_open"
            and (box := _CHECKBOX.match(token.content))
        ):
            checked = ' checked="checked"' if box[1] in "xX" else ""
            checkbox = f'<input class="task-list-item-checkbox"{checked} disabled="disabled" '
            token.content = token.content[3:]
            token.children[0].content = token.children[0].content[3:]
            token.children[:0] = [_html("<label>"), _html(checkbox + 'type="checkbox">')]
            token.children.append(_html("</label>"))
            tokens[i - 2].attrSet("class", "task-list-item")
            lists[-1].attrSet("class", "contains-task-list")


def _html(content: str) -> Token:
    return Token("html_inline", "", 0, content=content)


# Raw HTML in a task file is shown as text, never passed through; nh3 is the second wall.
_markdown = MarkdownIt("commonmark", {"html": False, "linkify": False}).enable(
    ["table", "strikethrough"]
)
_markdown.core.ruler.after("inline", "checklists", _checklists)
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


def render_body(text: str) -> SafeString:
    """A task's body for a page: markdown, and past RENDER_LIMIT the rest as plain text.
    A long body's rendering is kept by its hash: a crafted one takes up to a second, and a
    drawer is opened again and again while a person triages."""
    if len(text) < KEPT_FROM:
        return _render_body(text)
    key = f"body-html:{RENDERING}:{hashlib.sha256(text.encode()).hexdigest()}"
    html = cache.get(key)
    if html is None:
        html = _render_body(text)
        cache.set(key, str(html), KEPT_SECONDS)
    return mark_safe(html)  # noqa: S308 - sanitised by render_markdown before it was kept


def _render_body(text: str) -> SafeString:
    if len(text) <= RENDER_LIMIT:
        return render_markdown(text)
    cut = text.rfind("\n", 0, RENDER_LIMIT) + 1 or RENDER_LIMIT  # at a line's start
    return format_html(
        '{}<p class="cut">The body goes on for {} more characters, shown as written:</p>'
        '<pre class="rest">{}</pre>',
        render_markdown(text[:cut]),
        f"{len(text) - cut:,}",
        text[cut:],
    )


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
