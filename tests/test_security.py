"""Security basics of ``python app.py``, against conftest's fallback app, started the way a careless host might
start it: ``DALLE_MODEL=mini`` offline (so it falls back to tiny and shows the banner), a token in the
environment, and ``GRADIO_SHARE=True`` set. The app must still open no public link, take no file paths, serve files only
from gradio's temp folder, never show the token, and keep the banner to a short sentence.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError

REPO = Path(__file__).resolve().parent.parent
FILE_TYPES = {"file", "files", "image", "imageeditor", "simpleimage", "annotatedimage", "video", "audio",
              "uploadbutton", "gallery", "model3d", "multimodaltextbox", "imageslider", "downloadbutton"}
GOOD = ["a red bicycle", 10, 1, "parallel", 7, False, 50, 1.0, 1.0]  # /generate's inputs, in order


@pytest.fixture(scope="module")
def server(fallback_server):
    return fallback_server


@pytest.fixture(scope="module")
def temp_dir(server) -> Path:
    return Path(server.env["GRADIO_TEMP_DIR"])


@pytest.fixture(scope="module")
def client(server) -> Client:
    return Client(server.url, verbose=False)


def get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=30) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


def call(url: str, data: list) -> tuple[str, object]:
    """/generate over plain HTTP: the last event's name and data (the handler streams "generating" events per
    chunk first), with the file paths and urls gradio_client hides."""
    post = urllib.request.Request(url + "gradio_api/call/generate", data=json.dumps({"data": data}).encode(),
                                  headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(post, timeout=30) as response:
        event_id = json.load(response)["event_id"]
    with urllib.request.urlopen(f"{url}gradio_api/call/generate/{event_id}", timeout=120) as stream:
        lines = stream.read().decode().splitlines()
    event = [line.split(": ", 1)[1] for line in lines if line.startswith("event: ")][-1]
    payload = [line.split(": ", 1)[1] for line in lines if line.startswith("data: ")][-1]
    return event, json.loads(payload)


def test_no_share_link_even_when_the_environment_asks(server, client):
    client.config  # served: the launch has finished and logged its URLs
    log = server.log_tail(100_000)
    assert f"Running on local URL:  {server.url.rstrip('/')}" in log
    assert "gradio.live" not in log and "share link" not in log and "public URL" not in log


def test_no_input_takes_a_file(client):
    types = {component["id"]: component["type"] for component in client.config["components"]}
    inputs = {types[i] for dependency in client.config["dependencies"] for i in dependency["inputs"]}
    assert inputs and not inputs & FILE_TYPES, inputs
    api = client.view_api(return_format="dict", print_info=False)
    for name, endpoint in api["named_endpoints"].items():
        for parameter in endpoint["parameters"]:
            assert "file" not in json.dumps(parameter["python_type"]).lower(), (name, parameter)


def test_a_path_where_text_goes_is_only_text(server, temp_dir):
    event, (gallery, _) = call(server.url, ["/etc/passwd", *GOOD[1:]])
    assert event == "complete"
    assert gallery[0]["caption"] == "#1 · seed 7 · /etc/passwd"
    status, body = get(gallery[0]["image"]["url"])
    assert status == 200 and body.startswith(b"\x89PNG")
    assert b"root:" not in body


NO_FILES = "not a file: this Space accepts no files."


@pytest.mark.parametrize(("position", "field"), [(0, "Prompts takes text"), (1, "Condition scale takes a number"),
                                                 (4, "Seed takes a number")], ids=["prompt", "condition_scale", "seed"])
def test_a_file_reference_where_inputs_go_gets_a_sentence_and_nothing_is_read(server, temp_dir, position, field):
    """A FileData dict naming a server path: refused with a sentence before gradio would look for the file."""
    data = list(GOOD)
    data[position] = {"path": "/etc/passwd", "meta": {"_type": "gradio.FileData"}}
    event, payload = call(server.url, data)
    assert (event, payload["error"]) == ("error", f"{field}, {NO_FILES}")
    assert not [p for p in temp_dir.rglob("*") if p.name == "passwd"]
    assert "was not uploaded by a user" not in server.log_tail(100_000)  # gradio's own file check never ran


@pytest.mark.parametrize(("name", "field"), [("prompt", "Prompts takes text"), ("top_k", "Top-k takes a number"),
                                             ("sampler", "Sampler takes one of 'parallel', 'serial', 'compare'")])
def test_a_file_handed_to_gradio_client_gets_a_sentence_and_the_next_request_is_served(client, temp_dir, tmp_path,
                                                                                       name, field):
    """gradio_client uploads a ``handle_file`` before the call, so gradio would pass it on; the app refuses it."""
    upload = tmp_path / f"notes-{name}.txt"
    upload.write_text("<b>private notes</b>")
    request = dict(zip(["prompt", "condition_scale", "n_seeds", "sampler", "seed", "randomize_seed", "top_k",
                        "top_p", "temperature"], GOOD))
    with pytest.raises(AppError) as raised:
        client.predict(**{**request, name: handle_file(str(upload))}, api_name="/generate")
    assert str(raised.value) == f"{field}, {NO_FILES}"
    # the one copy is gradio's upload route's, made before the call; nothing copied it on
    assert len([p for p in temp_dir.rglob(upload.name)]) == 1
    images, _ = client.predict(**request, api_name="/generate")
    assert images[0]["caption"] == "#1 · seed 7 · a red bicycle"


def test_a_file_inside_a_list_input_gets_the_sentence_too(client, tmp_path):
    upload = tmp_path / "counts.txt"
    upload.write_text("1")
    with pytest.raises(AppError) as raised:
        client.predict(images=[1, handle_file(str(upload))], condition_scale=3, repeats=1, fit_limit=0,
                       api_name="/benchmark")
    assert str(raised.value) == f"Images per prompt takes a list of 1, 2, 4, 8, 16, {NO_FILES}"


def test_an_upload_over_the_cap_is_refused_and_not_kept(server, temp_dir):
    """Gradio's upload route is open on every app; this one takes no files, so it keeps nothing large."""
    boundary = "----cap"
    head = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"files\"; filename=\"big.bin\"\r\n"
            f"Content-Type: application/octet-stream\r\n\r\n")
    body = head.encode() + b"x" * 100_000 + f"\r\n--{boundary}--\r\n".encode()
    post = urllib.request.Request(server.url + "gradio_api/upload", data=body,
                                  headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(post, timeout=30)
    assert refused.value.code == 413
    assert not [p for p in temp_dir.rglob("big.bin")]


def test_gallery_files_come_only_from_gradios_temp_folder(server, temp_dir):
    event, (gallery, _) = call(server.url, GOOD)
    assert event == "complete"
    image = gallery[0]["image"]
    assert Path(image["path"]).resolve().is_relative_to(temp_dir.resolve())
    assert image["url"] == f"{server.url}gradio_api/file={image['path']}"
    assert get(image["url"])[0] == 200
    for path in ["/etc/passwd", str(REPO / "app.py"), f"{temp_dir}/../../../../etc/passwd", "../../etc/passwd"]:
        status, body = get(f"{server.url}gradio_api/file={path}")
        assert status in (403, 404), (path, status)
        assert b"root:" not in body


def test_the_token_in_the_environment_never_shows(server, client):
    texts = [get(server.url)[1].decode(errors="replace"), get(server.url + "config")[1].decode(errors="replace"),
             get(server.url + "gradio_api/info")[1].decode(errors="replace")]
    texts.append(json.dumps(call(server.url, GOOD)[1]))
    texts.append(json.dumps(call(server.url, ["", *GOOD[1:]])[1]))  # an error's payload too
    texts.append(server.log_tail(1_000_000))
    for text in texts:
        assert server.env["HF_TOKEN"] not in text


def test_the_fallback_banner_is_one_short_sentence(client):
    banners = [c["props"]["value"] for c in client.config["components"]
               if "fallback-banner" in (c.get("props", {}).get("elem_classes") or [])]
    banners = [banner for banner in banners if "could not be downloaded" in banner]
    assert len(banners) == 1
    text = banners[0].replace("⚠️", "").replace("**", "").strip()
    assert "could not be downloaded" in text and "tiny" in text
    assert "Traceback" not in text and "\n" not in text and "Error" not in text
    assert len(text) <= 200, f"{len(text)} characters: {text}"
    assert text.count(". ") == 0 and text.endswith("."), text


def test_the_log_names_the_device_that_samples(server, client):
    client.config  # served: start-up has finished
    assert "Model tiny (float32) samples on CPU (cpu) x1." in server.log_tail(100_000)
