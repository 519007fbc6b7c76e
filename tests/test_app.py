"""`difflab app` served on 127.0.0.1 with tiny models, each endpoint called through gradio_client as the page
calls it: results, the same images as the CLI, bad input answered with a message, requests kept apart."""

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

pytest.importorskip("gradio", reason="the [app] extra is not installed")
from gradio_client import Client, handle_file  # noqa: E402

from difflab.cli import app as cli  # noqa: E402

DIGITS = {"domain": "svhn", "digit": 7, "guidance_digit": 6, "guidance_domain": 1, "method": "dpm++2m", "steps": 3}


@pytest.fixture(scope="module")
def client(tiny_app):
    return Client(tiny_app.url, verbose=False)


def pixels(path: str, factor: int = 4) -> np.ndarray:
    """An image the app shows, back at the model's size (the app enlarges by whole pixels)."""
    return np.asarray(Image.open(path).convert("RGB"))[::factor, ::factor]


def digits(client: Client, seed: int = 0, count: int = 4, **changes):
    args = {**DIGITS, **changes}
    return client.predict(**args, eta=1.0, seed=seed, count=count, api_name="/digits")  # named as on the page


def test_the_api_names_every_input_as_the_page_does(client):
    endpoints = client.view_api(print_info=False, return_format="dict")["named_endpoints"]
    names = {api: [p["parameter_name"] for p in info["parameters"]] for api, info in endpoints.items()}
    assert names["/digits"][:3] == ["domain", "digit", "guidance_digit"]
    assert all(not name.startswith("param_") for params in names.values() for name in params), names


def test_digits_tab_gives_the_cli_images_with_verdicts(client, tiny_app, tmp_path):
    gallery, strip, verdict = digits(client, seed=5, count=4)
    assert len(gallery) == 4 and all(item["caption"].startswith(f"#{n + 1}: ") for n, item in enumerate(gallery))
    assert "the svhn judge reads" in verdict and "t=0" in verdict
    assert pixels(strip).shape == (2 + 28 + 2, 6 * 30 + 2, 3)  # six frames of the first image
    ckpt = tiny_app.root / "run" / "model"
    args = ["digits", "sample", "--ckpt", str(ckpt), "--out", str(tmp_path / "cli"), "--per-digit", "4"]
    more = ["--method", DIGITS["method"], "--steps", "3", "--seed", "5", "--precision", "fp32", "--device", "cpu"]
    more += ["--guidance-digit", str(DIGITS["guidance_digit"]), "--no-figures"]
    assert CliRunner().invoke(cli, [*args, *more]).exit_code == 0
    for n, item in enumerate(gallery):
        cli_image = np.asarray(Image.open(tmp_path / "cli" / "svhn" / f"7_{n + 1:03d}.png")).astype(int)
        # Another batch (the CLI samples all digits at once) may move a few pixels by one grey level.
        assert np.abs(pixels(item["image"]) - cli_image).max() <= 1


def test_ddim_tab_strips_interpolation_and_inversion(client):
    etas, strips, pair, note = client.predict(
        "mnistm", 3, 3, 0, 1, None, None, 5, 0.5, api_name="/ddim"
    )  # domain, digit, guidance, seeds A and B, no noise files, steps, α
    assert pixels(etas).shape[1] == 5 * 30 + 2 and pixels(strips).shape[0] == 2 * 30 + 2
    assert "lerp" in note and "slerp" in note
    both, mse = client.predict("mnistm", 3, 3, handle_file(pair), 5, api_name="/invert")  # an image it made, back
    assert "MSE" in mse and pixels(both).shape[1] == 2 * 30 + 2


def test_clip_tab_top5_one_template_and_ensemble(client, tmp_path, random_images):
    image = tmp_path / "x.png"
    random_images(1)[0].convert("RGB").save(image)
    names = "cat, dog, car, tree, boat, house"
    one, ensemble, note = client.predict(
        handle_file(str(image)), names, None, "a {}.\na photo of a {}.", api_name="/clip"
    )
    assert len(one["confidences"]) == 5 and len(ensemble["confidences"]) == 5
    assert {c["label"] for c in one["confidences"]} <= set(names.replace(" ", "").split(","))
    assert "2 templates" in note


def test_personalize_tab_scores_and_composition(client):
    images, note = client.predict("a <new1> next to a <new2>", "a photo", 2, 2, 7.5, 0, api_name="/personalize")
    assert len(images) == 2 and all("image" in item["caption"] and "text" in item["caption"] for item in images)
    assert "references of `<new1>`, `<new2>`" in note
    naive, composed, _ = client.predict(
        "a <new1>", "a <new2>", "0,0,0.5,1", "0.5,0,1,1", 2, 7.5, 0, api_name="/compose"
    )
    assert Image.open(naive).size == Image.open(composed).size


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda c: digits(c, count=1000), "1000 is greater than maximum value 64"),  # the slider's own check
        (lambda c: digits(c, seed=-1), "seed = -1: must be in"),
        (lambda c: c.predict(None, "a, b", None, "", api_name="/clip"), "upload or pick an image"),
        (lambda c: c.predict(handle_file(__file__), "a, b", None, "", api_name="/clip"), "Error"),
        (lambda c: c.predict("a <new9>", "", 1, 2, 7.5, 0, api_name="/personalize"), "no loaded embedding"),
        (lambda c: c.predict("a", "b", "0,0,2,1", "0.5,0,1,1", 2, 7.5, 0, api_name="/compose"), "box '0,0,2,1'"),
    ],
)
def test_bad_input_is_a_message_and_the_server_stays_up(client, call, message):
    with pytest.raises(Exception, match=message.replace("[", r"\[").replace("]", r"\]")) as error:
        call(client)
    assert "Traceback" not in str(error.value)
    assert len(digits(client, count=1)[0]) == 1


def test_requests_at_once_are_queued_and_kept_apart(client):
    jobs = [client.submit(*DIGITS.values(), 1.0, seed, 2, api_name="/digits") for seed in (1, 2, 1)]
    first, second, again = [[pixels(item["image"]) for item in job.result()[0]] for job in jobs]
    assert all(np.array_equal(a, b) for a, b in zip(first, again))
    assert not np.array_equal(first[0], second[0])
