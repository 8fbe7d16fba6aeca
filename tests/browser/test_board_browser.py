from tests.browser.conftest import screenshot


def test_login_reaches_the_board(logged_in_page, live_url):
    page = logged_in_page
    assert page.url.rstrip("/") == live_url
    assert "Hypervisor" in page.title()
    screenshot(page, "board-after-login")
