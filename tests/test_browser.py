"""The page in a real browser: Debian's headless chromium driven by Playwright against ``python app.py``."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ARTIFACTS = Path(__file__).resolve().parent / "artifacts"
SAMPLING_TIMEOUT_MS = 120_000


@pytest.fixture
def page(browser, app_server):
    context = browser.new_context(viewport={"width": 1280, "height": 1000})
    page = context.new_page()
    page.goto(app_server.url)
    page.get_by_role("button", name="Generate", exact=True).wait_for()
    yield page
    context.close()


def test_compare_both_shows_images_and_timings(page):
    from playwright.sync_api import expect

    page.get_by_label("Prompts").fill("a red bicycle leaning against a brick wall")
    page.get_by_label("Compare both").check()
    page.get_by_role("button", name="Generate", exact=True).click()

    images = page.locator("#gallery img")
    expect(images.first).to_be_visible(timeout=SAMPLING_TIMEOUT_MS)
    timings = page.locator("#timings")
    expect(timings).to_contain_text(re.compile(r"(Parallel|Serial) is [\d.]+× faster"), timeout=SAMPLING_TIMEOUT_MS)
    for header in ("serial", "parallel", "VQGAN", "compile", "s / image"):
        expect(timings).to_contain_text(header)
    expect(page.locator("#model-line")).to_contain_text("tiny")
    expect(page.get_by_text(re.compile(r"#1 · seed \d+ · a red bicycle")).first).to_be_attached()
    _expect_plot_drawn(page, "#stage-plot", ["serial", "parallel"])

    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=ARTIFACTS / "compare.png", full_page=True)


def _expect_plot_drawn(page, selector: str, legend: list[str]) -> None:
    """A native gradio plot drew marks (vega's SVG paths) with every legend entry."""
    from playwright.sync_api import expect

    plot = page.locator(selector)
    expect(plot.locator("svg .mark-line path, svg .mark-rect path").first).to_be_attached(timeout=30_000)
    for entry in legend:
        expect(plot.locator("svg")).to_contain_text(entry)


def test_benchmark_tab_sweeps_and_draws_both_plots(page):
    from playwright.sync_api import expect

    page.get_by_role("tab", name="Benchmark").click()
    for count in ("1", "2"):
        expect(page.get_by_role("checkbox", name=count, exact=True)).to_be_checked()
    page.get_by_role("button", name="Run benchmark").click()

    table = page.locator("#bench-table")
    expect(table).to_contain_text("parallel vs serial", timeout=SAMPLING_TIMEOUT_MS)
    expect(table).to_contain_text("Matrix products in one optimised step")
    for selector in ("#time-plot", "#memory-plot"):
        _expect_plot_drawn(page, selector, ["serial", "parallel"])
    page.get_by_text("Why the gap is what it is").click()
    expect(page.get_by_text("bound by reading the weights")).to_be_visible()

    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=ARTIFACTS / "benchmark.png", full_page=True)


def test_empty_prompt_shows_a_readable_error(page):
    from playwright.sync_api import expect

    page.get_by_role("button", name="Generate", exact=True).click()
    toast = page.get_by_test_id("toast-text")
    expect(toast).to_contain_text("Please enter a prompt", timeout=30_000)
    expect(page.get_by_text("Traceback")).to_have_count(0)
    page.wait_for_timeout(500)  # let the toast finish sliding in before the picture
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=ARTIFACTS / "empty_prompt_error.png")


def test_progressive_previews_appear_before_the_final_images(page):
    from playwright.sync_api import expect

    page.get_by_label("Prompts").fill("a lighthouse on a cliff at night")
    page.get_by_text("Advanced").click()
    page.get_by_label("Progressive previews").check()
    page.get_by_label("Randomise seed").uncheck()
    # Previews come and go quickly with the tiny model: note any preview caption the page ever shows.
    page.evaluate(
        """() => {
            window.sawPreview = false;
            const gallery = document.querySelector('#gallery');
            new MutationObserver(() => {
                if (gallery.textContent.includes('(preview)')) window.sawPreview = true;
            }).observe(gallery, {subtree: true, childList: true, characterData: true});
        }"""
    )
    page.get_by_role("button", name="Generate", exact=True).click()

    expect(page.locator("#timings")).to_contain_text("total", timeout=SAMPLING_TIMEOUT_MS)
    expect(page.get_by_text("#1 · seed 0 · a lighthouse on a cliff at night", exact=True)).to_be_attached()
    assert page.evaluate("window.sawPreview"), "no preview reached the page before the final images"
    expect(page.locator("#gallery")).not_to_contain_text("(preview)")
