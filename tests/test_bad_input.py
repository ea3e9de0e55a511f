"""Bad input, table-driven: every malformed request gets one sentence naming the field and what it takes,
odd but valid text (emoji, CJK, right-to-left, HTML) is sampled like any other, and the queue keeps serving.

Two doors: the app's endpoints through gradio_client (and raw HTTP for what gradio_client cannot send),
and ``Engine.generate`` for library callers. docs/reliability.md holds the same table in prose.
"""

from __future__ import annotations

import json
import re
import urllib.request

import pytest
from gradio_client import Client
from gradio_client.exceptions import AppError

from dalle_space.engine import MAX_SEED

GOOD = dict(
    prompt="a red bicycle", condition_scale=10, n_seeds=1, sampler="parallel", seed=7,
    randomize_seed=False, top_k=50, top_p=1.0, temperature=1.0,
)
MAX_IMAGES = 16  # engine.DEFAULT_MAX_IMAGES, what the app allows per request
SEED_MAX = MAX_SEED - MAX_IMAGES
HTML_PROMPT = "<img src=x onerror=alert(1)><b>bold</b>"

# (row id, endpoint, changes to GOOD, the exact sentence the person gets)
BAD_API_ROWS = [
    ("empty prompt", "/generate", dict(prompt=""),
     "Please enter a prompt: a few words describing the picture you want."),
    ("whitespace-only prompt", "/generate", dict(prompt="  \n\t \n"),
     "Please enter a prompt: a few words describing the picture you want."),
    ("zero-width-only prompt", "/generate", dict(prompt="\u200b\u200d\ufeff\n\u200e"),
     "Please enter a prompt: a few words describing the picture you want."),
    ("control characters", "/generate", dict(prompt="\x00\x07"),
     "Prompt 1 contains the control character U+0000; a prompt takes printable text only."),
    ("terminal escape in 2nd prompt", "/generate", dict(prompt="a cat\n\x1b[31mred\x1b[0m"),
     "Prompt 2 contains the control character U+001B; a prompt takes printable text only."),
    ("100,000-character prompt", "/generate", dict(prompt="a" * 100_000),
     "Prompt 1 has 100,000 characters; a prompt takes at most 1,000."),
    ("5 prompts", "/generate", dict(prompt="a\nb\nc\nd\ne"),
     "You entered 5 prompts; one request takes at most 4 (one per line)."),
    ("prompt None", "/generate", dict(prompt=None), "The prompt must be text."),
    ("prompt a number", "/generate", dict(prompt=42), "The prompt must be text."),
    ("images 0", "/generate", dict(n_seeds=0), "Images per prompt must be between 1 and 16, not 0."),
    ("images 17", "/generate", dict(n_seeds=17), "Images per prompt must be between 1 and 16, not 17."),
    ("images 1.5", "/generate", dict(n_seeds=1.5),
     "Images per prompt must be a whole number between 1 and 16, not 1.5."),
    ("images true", "/generate", dict(n_seeds=True),
     "Images per prompt must be a whole number between 1 and 16, not True."),
    ("2 prompts x 16 images", "/generate", dict(prompt="a cat\na dog", n_seeds=16),
     "That asks for 32 images (2 prompts × 16 each), but one request makes at most 16; "
     "use fewer prompts or fewer images per prompt."),
    ("scale 'NaN'", "/generate", dict(condition_scale="NaN"),
     "Condition scale must be a finite number between 1 and 20, not nan."),
    ("scale 'inf'", "/generate", dict(condition_scale="inf"),
     "Condition scale must be a finite number between 1 and 20, not inf."),
    ("scale '-inf'", "/generate", dict(condition_scale="-inf"),
     "Condition scale must be a finite number between 1 and 20, not -inf."),
    ("scale 'ten'", "/generate", dict(condition_scale="ten"),
     "Condition scale must be a number between 1 and 20, not 'ten'."),
    ("scale None", "/generate", dict(condition_scale=None),
     "Condition scale must be a number between 1 and 20, not None."),
    ("scale 0.5", "/generate", dict(condition_scale=0.5), "Condition scale must be between 1 and 20, not 0.5."),
    ("scale 1e300", "/generate", dict(condition_scale=1e300),
     "Condition scale must be between 1 and 20, not 1e+300."),
    ("seed -1", "/generate", dict(seed=-1), f"Seed must be between 0 and {SEED_MAX}, not -1."),
    ("seed 2**31", "/generate", dict(seed=2**31), f"Seed must be between 0 and {SEED_MAX}, not 2147483648."),
    ("seed 7.5", "/generate", dict(seed=7.5), f"Seed must be a whole number between 0 and {SEED_MAX}, not 7.5."),
    ("seed as markup", "/generate", dict(seed="<b>x</b>"),
     f"Seed must be a whole number between 0 and {SEED_MAX}, not a text of 8 characters."),
    ("top-k 0", "/generate", dict(top_k=0), "Top-k must be between 1 and 16384, not 0."),
    ("top-k 16385", "/generate", dict(top_k=16385), "Top-k must be between 1 and 16384, not 16385."),
    ("top-k 2.5", "/generate", dict(top_k=2.5), "Top-k must be a whole number between 1 and 16384, not 2.5."),
    ("top-k 10**400", "/generate", dict(top_k=10**400),
     "Top-k must be a whole number between 1 and 16384, not a number too large to use."),
    ("top-p 0", "/generate", dict(top_p=0), "Top-p must be between 0.01 and 1, not 0."),
    ("top-p 1.5", "/generate", dict(top_p=1.5), "Top-p must be between 0.01 and 1, not 1.5."),
    ("top-p None", "/generate", dict(top_p=None), "Top-p must be a number between 0.01 and 1, not None."),
    ("temperature 0", "/generate", dict(temperature=0), "Temperature must be between 0.1 and 2, not 0."),
    ("temperature 2.5", "/generate", dict(temperature=2.5), "Temperature must be between 0.1 and 2, not 2.5."),
    ("temperature 'hot'", "/generate", dict(temperature="hot"),
     "Temperature must be a number between 0.1 and 2, not 'hot'."),
    ("unknown sampler", "/generate", dict(sampler="fastest"),
     "Sampler must be one of 'parallel', 'serial', 'compare', not 'fastest'."),
    ("sampler None", "/generate", dict(sampler=None),
     "Sampler must be one of 'parallel', 'serial', 'compare', not None."),
    ("sampler a list", "/generate", dict(sampler=["parallel"]),
     "Sampler must be one of 'parallel', 'serial', 'compare', not a list."),
    ("randomise seed 'no'", "/generate", dict(randomize_seed="no"),
     "Randomise seed must be true or false, not 'no'."),
    ("compare: empty prompt", "/compare", dict(prompt=""),
     "Please enter a prompt: a few words describing the picture you want."),
    ("compare: images 17", "/compare", dict(n_seeds=17), "Images per prompt must be between 1 and 16, not 17."),
]

# Valid but odd: sampled, and the caption shows the prompt exactly as typed (trimmed).
ODD_API_ROWS = [
    ("emoji only", dict(prompt="🥑🚲🌋"), "🥑🚲🌋"),
    ("CJK", dict(prompt="一只红色的自行车"), "一只红色的自行车"),
    ("right-to-left", dict(prompt="دراجة حمراء \u202eabc"), "دراجة حمراء \u202eabc"),
    ("zero-width inside", dict(prompt="  a\u200bred bicycle  "), "a\u200bred bicycle"),
    ("HTML and script", dict(prompt=HTML_PROMPT), HTML_PROMPT),
    ("numbers as numeric strings, floats where whole numbers go",
     dict(prompt="a fox", seed="42", n_seeds=1.0, top_k=50.0, condition_scale="7.5"), "a fox"),
]


@pytest.fixture(scope="module")
def client(app_server) -> Client:
    return Client(app_server.url, verbose=False)


def call(client: Client, api_name: str = "/generate", **changes):
    args = {**GOOD, **changes}
    if api_name == "/compare":
        args.pop("sampler")
    return client.predict(**args, api_name=api_name)


def assert_serving(client: Client) -> None:
    """A good request right after: the queue and the engine still work."""
    images, summary = call(client, seed=3)
    assert len(images) == 1 and summary["images"] == 1


@pytest.mark.parametrize("api_name, changes, message", [r[1:] for r in BAD_API_ROWS],
                         ids=[r[0] for r in BAD_API_ROWS])
def test_bad_request_gets_one_sentence_and_the_queue_keeps_serving(client, api_name, changes, message):
    with pytest.raises(AppError) as raised:
        call(client, api_name, **changes)
    assert str(raised.value) == message
    assert "\n" not in message and "Traceback" not in message
    assert_serving(client)


@pytest.mark.parametrize("changes, caption_prompt", [r[1:] for r in ODD_API_ROWS], ids=[r[0] for r in ODD_API_ROWS])
def test_odd_but_valid_prompt_is_sampled_and_captioned_verbatim(client, changes, caption_prompt):
    images, summary = call(client, **changes)
    seed = int(changes.get("seed", GOOD["seed"]))
    assert [item["caption"] for item in images] == [f"#1 · seed {seed} · {caption_prompt}"]
    assert summary["images"] == 1


def http_call(url: str, body: str) -> str:
    """POST a raw JSON body to /generate and return the event stream: for what gradio_client cannot send."""
    post = urllib.request.Request(url + "gradio_api/call/generate", data=body.encode(),
                                  headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(post, timeout=30) as response:
        event_id = json.load(response)["event_id"]
    with urllib.request.urlopen(f"{url}gradio_api/call/generate/{event_id}", timeout=60) as stream:
        return stream.read().decode()


def error_of(events: str) -> str:
    """The message of the stream's error event."""
    assert "event: error" in events, events
    return json.loads(re.search(r"event: error\ndata: (.*)", events).group(1))["error"]


def test_lone_surrogate_reaches_the_engine_and_gets_its_sentence(app_server, client):
    """JSON can carry a lone surrogate as an escape; the app's checks let it through and the engine,
    which tokenizes, refuses it inside the worker, under the engine lock. Nothing stays held."""
    events = http_call(app_server.url, '{"data": ["a \\ud800 cat", 10, 1, "parallel", 0, false, 50, 1.0, 1.0]}')
    assert error_of(events) == "Prompt 1 is not valid text: it holds the lone surrogate U+D800."
    _, summary = call(client, seed=5)
    assert summary["timings"]["parallel"]["compiled"] is False


def test_nan_and_missing_values_over_raw_json(app_server, client):
    events = http_call(app_server.url, '{"data": ["a cat", 10, 1, "parallel", 0, false, NaN, 1.0, 1.0]}')
    assert error_of(events) == "Top-k must be a finite number between 1 and 16384, not nan."
    events = http_call(app_server.url, '{"data": ["a cat", 10, 1, "parallel", 0, false, 50, 1.0, null]}')
    assert error_of(events) == "Temperature must be a number between 0.1 and 2, not None."
    assert_serving(client)


# ---------------------------------------------------------------------------------------------------
# Engine.generate, the library door: one ValueError sentence per bad argument, whatever its type.

ENGINE_GOOD = dict(prompts=["a red bicycle"], n_seeds=1, condition_scale=10.0, mode="parallel", seed=0,
                   top_p=None, temperature=1.0)  # the model's own top-k, as warmup compiled it

BAD_ENGINE_ROWS = [
    ("prompts one string", dict(prompts="a cat"), "prompts must be a list of strings, not one string."),
    ("no prompts", dict(prompts=[]), "Every prompt needs some text."),
    ("blank prompt", dict(prompts=["ok", "  \t"]), "Every prompt needs some text."),
    ("prompt None", dict(prompts=[None]), "Prompt 1 must be a string, not NoneType."),
    ("prompt a number", dict(prompts=["ok", 5]), "Prompt 2 must be a string, not int."),
    ("lone surrogate", dict(prompts=["ok", "x\udfff"]),
     "Prompt 2 is not valid text: it holds the lone surrogate U+DFFF."),
    ("n_seeds 1.5", dict(n_seeds=1.5), "n_seeds must be a whole number of at least 1, not 1.5."),
    ("n_seeds '2'", dict(n_seeds="2"), "n_seeds must be a whole number of at least 1, not '2'."),
    ("n_seeds None", dict(n_seeds=None), "n_seeds must be a whole number of at least 1, not None."),
    ("n_seeds 0", dict(n_seeds=0), "Ask for at least one image."),
    ("n_seeds 17", dict(n_seeds=17), "At most 16 images fit in one request; 17 were asked for."),
    ("scale NaN", dict(condition_scale=float("nan")),
     "The condition scale must be a finite number of at least 0, not nan."),
    ("scale inf", dict(condition_scale=float("inf")),
     "The condition scale must be a finite number of at least 0, not inf."),
    ("scale 'ten'", dict(condition_scale="ten"),
     "The condition scale must be a finite number of at least 0, not 'ten'."),
    ("scale -1", dict(condition_scale=-1.0), "The condition scale must be a finite number of at least 0, not -1.0."),
    ("unknown mode", dict(mode="fastest"), "The sampler mode must be one of parallel, serial, not 'fastest'."),
    ("mode None", dict(mode=None), "The sampler mode must be one of parallel, serial, not None."),
    ("seed -1", dict(seed=-1), f"The seed must be a whole number from 0 to {MAX_SEED - 1}, not -1."),
    ("seed MAX_SEED", dict(seed=MAX_SEED),
     f"The seed must be a whole number from 0 to {MAX_SEED - 1}, not {MAX_SEED}."),
    ("seed 1.5", dict(seed=1.5), f"The seed must be a whole number from 0 to {MAX_SEED - 1}, not 1.5."),
    ("seed None", dict(seed=None), f"The seed must be a whole number from 0 to {MAX_SEED - 1}, not None."),
    ("top-k 0", dict(top_k=0), "top-k must be a whole number of at least 1, not 0."),
    ("top-k 2.5", dict(top_k=2.5), "top-k must be a whole number of at least 1, not 2.5."),
    ("top-k '50'", dict(top_k="50"), "top-k must be a whole number of at least 1, not '50'."),
    ("top-k inf", dict(top_k=float("inf")), "top-k must be a whole number of at least 1, not inf."),
    ("top-p 0", dict(top_p=0.0), "top-p must be greater than 0 and at most 1, not 0.0."),
    ("top-p NaN", dict(top_p=float("nan")), "top-p must be greater than 0 and at most 1, not nan."),
    ("top-p '0.9'", dict(top_p="0.9"), "top-p must be greater than 0 and at most 1, not '0.9'."),
    ("temperature 0", dict(temperature=0.0), "The temperature must be a number greater than 0, not 0.0."),
    ("temperature inf", dict(temperature=float("inf")), "The temperature must be a number greater than 0, not inf."),
    ("temperature None", dict(temperature=None), "The temperature must be a number greater than 0, not None."),
]

ODD_ENGINE_ROWS = [
    ("emoji", ["🥑🚲"]),
    ("CJK", ["一只红色的自行车"]),
    ("right-to-left", ["دراجة حمراء"]),
    ("HTML", [HTML_PROMPT]),
    ("control characters", ["a\x00cat\x1b"]),  # the app refuses these; the engine just tokenizes them
    ("zero-width", ["\u200b"]),
]


@pytest.mark.parametrize("changes, message", [r[1:] for r in BAD_ENGINE_ROWS], ids=[r[0] for r in BAD_ENGINE_ROWS])
def test_engine_refuses_bad_arguments_with_one_sentence(tiny, changes, message):
    with pytest.raises(ValueError) as raised:
        tiny.generate(**{**ENGINE_GOOD, **changes})
    assert str(raised.value) == message
    result = tiny.generate(**ENGINE_GOOD)
    assert result.images.shape[0] == 1 and result.timings.compiled is False


@pytest.mark.parametrize("prompts", [r[1] for r in ODD_ENGINE_ROWS], ids=[r[0] for r in ODD_ENGINE_ROWS])
def test_engine_samples_odd_but_valid_text(tiny, prompts):
    result = tiny.generate(**{**ENGINE_GOOD, "prompts": prompts})
    assert result.prompts == tuple(prompts) and result.images.shape[0] == 1


def test_engine_cuts_a_100000_character_prompt_with_a_notice(tiny):
    result = tiny.generate(**{**ENGINE_GOOD, "prompts": ["a" * 100_000]})
    assert result.notices == ("Prompt 1 was longer than 40 tokens and was cut short.",)


def test_engine_takes_whole_floats_and_numpy_numbers(tiny):
    import numpy as np

    result = tiny.generate(**{**ENGINE_GOOD, "n_seeds": 2.0, "seed": np.int64(4), "top_k": 50.0,
                              "condition_scale": np.float32(3)})
    assert result.seeds == (4, 5)


# ---------------------------------------------------------------------------------------------------
# In a browser: HTML in a prompt is text everywhere the page shows it.

def test_html_in_a_prompt_is_shown_as_text_in_the_page(app_server, browser):
    from playwright.sync_api import expect

    context = browser.new_context(viewport={"width": 1280, "height": 1000})
    try:
        page = context.new_page()
        dialogs = []
        page.on("dialog", lambda dialog: (dialogs.append(dialog.message), dialog.dismiss()))
        page.goto(app_server.url)
        page.get_by_role("button", name="Generate", exact=True).wait_for()
        page.get_by_label("Prompts").fill(HTML_PROMPT)
        page.get_by_role("button", name="Generate", exact=True).click()
        caption = page.get_by_text(re.compile(r"#1 · seed \d+ · " + re.escape(HTML_PROMPT)))
        expect(caption.first).to_be_attached(timeout=120_000)
        expect(page.locator("#timings")).to_contain_text("total", timeout=60_000)
        page.locator("#gallery img").first.click()  # the enlarged view shows the caption too
        page.wait_for_timeout(300)
        assert page.locator("b", has_text="bold").count() == 0, "the prompt's <b> became an element"
        assert page.locator("img[src='x']").count() == 0, "the prompt's <img> became an element"
        assert dialogs == []
    finally:
        context.close()
