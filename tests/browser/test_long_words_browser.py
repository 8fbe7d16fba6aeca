"""Long unbroken words stay inside their boxes: the card, the drawer, the filter bar."""

from __future__ import annotations

from playwright.sync_api import expect

from tests.browser.conftest import screenshot
from tests.conftest import make_tasks

TITLE = "T" * 400
TAG = "t" * 108
ASSIGNEE = "a" * 150
URL = "https://example.com/" + "u" * 499  # 519 characters
BODY = f"See {URL} for the details.\n\n`{'c' * 300}`\n"

# The widest any descendant of `box` reaches past the box's own right edge, in px, and
# what it is; and how much wider the box's content is than the box.
OVERFLOW = """box => {
  const right = box.getBoundingClientRect().right;
  let worst = 0, what = "";
  for (const el of box.querySelectorAll("*")) {
    if (el.closest("pre, .vh")) continue;  // a code block scrolls in its own box
    const past = el.getBoundingClientRect().right - right;
    if (past > worst) { worst = past; what = el.tagName + "." + el.className; }
  }
  return {past: Math.round(worst), what, scroll: box.scrollWidth - box.clientWidth};
}"""


def test_long_words_stay_inside_the_card_the_drawer_and_the_filter_bar(logged_in_page, live_url):
    (task,) = make_tasks(
        "long",
        1,
        body=BODY,
        assignee=ASSIGNEE,
        project="web",
        tags=[TAG],
        tag_index=f"|{TAG}|",
    )
    task.title = TITLE
    task.save(update_fields=["title"])
    page = logged_in_page
    page.goto(f"{live_url}/?queue=long")

    card = page.locator(f'article.card[data-id="{task.pk}"]')
    expect(card).to_be_visible()
    assert card.evaluate(OVERFLOW) == {"past": 0, "what": "", "scroll": 0}

    # The filter bar's dropdowns keep a width of their own, whatever their longest value:
    # measured once they hold it (they are counted after the board is on screen, and
    # swapped in whole).
    for name, value in (("assignee", ASSIGNEE), ("tag", TAG)):
        select = page.locator(f"form.filters select[name={name}]")
        expect(select.locator(f'option[value="{value}"]')).to_have_count(1)
        width = select.bounding_box()["width"]
        assert width <= 260, (name, width)

    card.locator("a.title").click()
    drawer = page.locator("aside#drawer")
    expect(drawer.locator("h1")).to_have_text(TITLE)
    assert drawer.evaluate(OVERFLOW) == {"past": 0, "what": "", "scroll": 0}
    # The title wraps beside the close button, never under it.
    title = drawer.locator("h1").bounding_box()
    close = drawer.locator("a.close").bounding_box()
    assert title["x"] + title["width"] <= close["x"] + 1
    screenshot(page, "long-words-drawer")

    drawer.locator("a[data-edit]").click()
    expect(drawer.locator("form.edit-form")).to_be_visible()
    assert drawer.evaluate(OVERFLOW) == {"past": 0, "what": "", "scroll": 0}
