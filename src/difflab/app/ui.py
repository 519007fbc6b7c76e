"""The app's page: four tabs over `handlers`, one queue (requests run one at a time, so two browser tabs never
mix results), errors shown on the page as one line."""

from __future__ import annotations

import inspect
import tempfile
from pathlib import Path

import gradio as gr

from difflab.app import handlers
from difflab.app.models import AppConfig, Models
from difflab.digits.data import DOMAINS
from difflab.digits.sample import SampleConfig
from difflab.io import save_png
from difflab.utils import DifflabError

DIGIT_NAMES = "zero, one, two, three, four, five, six, seven, eight, nine"
TEMPLATES = "\n".join(
    [
        "A photo of {}.",
        "a photo of the number {}.",
        "a blurry photo of the number {}.",
        "a good photo of the number {}.",
    ]
)
# On a phone five thumbnails a row overflow the gallery: three, each shrinking to fit.
CSS = """footer{display:none!important}
@media (max-width: 640px){#digits-gallery .grid-container,#personalize-gallery .grid-container{
grid-template-columns:repeat(3,minmax(0,1fr))!important}}"""


def endpoint(models: Models, fn):
    """`fn(models, *values)` for gradio: a difflab error becomes the page's message, anything else one line too,
    and the server stays up. The endpoint carries `fn`'s parameter names (less `models`), so that the API names its
    inputs as the page does: `client.predict(domain="svhn", digit=3, api_name="/digits")`."""
    params = list(inspect.signature(fn).parameters.values())[1:]

    def run(*values, **named):
        try:
            return fn(models, *values[: len(params)])  # gradio adds the progress tracker after the inputs
        except DifflabError as e:
            raise gr.Error(str(e)) from None
        except Exception as e:  # a bad upload, a model that fails: a message, never a traceback page
            raise gr.Error(f"{type(e).__name__}: {e}".splitlines()[0]) from None

    tracker = inspect.Parameter(
        "progress", inspect.Parameter.POSITIONAL_OR_KEYWORD, default=gr.Progress(track_tqdm=True)
    )
    run.__signature__ = inspect.Signature([p.replace(annotation=inspect.Parameter.empty) for p in params] + [tracker])
    run.__name__ = fn.__name__
    return run


def gallery(elem_id: str, label: str, columns: int) -> gr.Gallery:
    """Captioned images, whole (not cropped), as lossless PNG so the served pixels are the computed ones."""
    return gr.Gallery(elem_id=elem_id, label=label, columns=columns, height="auto", object_fit="contain", format="png")


def example_digits(n: int = 3) -> list[str]:
    """A few held-out digits of each style as PNG files, to pick in the CLIP tab."""
    from difflab.minisd.data import single_digits

    folder = Path(tempfile.mkdtemp(prefix="difflab-app-"))
    held = single_digits(n, seed=1, split="val")
    return [str(save_png(img, folder / f"{i}.png")) for i, img in enumerate(held.images)]


def digits_tab(models: Models, cfg: AppConfig) -> None:
    if not (cfg.digits_model / "config.json").is_file():
        gr.Markdown(
            f"**No digits model at `{cfg.digits_model}`.** Run `make demo` (about 9 minutes on 2 cores), or start "
            "the app with `--digits-model FOLDER` (any `difflab digits train` output)."
        )
    s = SampleConfig().for_model(models.digits_config())
    with gr.Row():
        with gr.Column(scale=1, min_width=260):
            domain = gr.Radio(list(DOMAINS), value=DOMAINS[0], label="domain")
            digit = gr.Slider(0, 9, value=7, step=1, label="digit")
            g_digit = gr.Slider(0, 15, value=s.guidance_digit, step=0.5, label="digit guidance (1: none)")
            g_domain = gr.Slider(0, 15, value=s.guidance_domain, step=0.5, label="domain guidance (1: none)")
            method = gr.Dropdown(["dpm++2m", "ddim", "ddpm"], value=s.method, label="sampler")
            steps = gr.Slider(1, 100, value=s.steps, step=1, label="steps (ddpm: all of the model's)")
            eta = gr.Slider(0, 1, value=s.eta, step=0.05, label="η (ddim)")
            seed = gr.Number(value=s.seed, precision=0, label="seed (as digits sample --seed)")
            count = gr.Slider(1, handlers.MAX_IMAGES, value=10, step=1, label="images")
            go = gr.Button("Generate", variant="primary", elem_id="digits-go")
        with gr.Column(scale=2):
            grid = gallery("digits-gallery", "images, with the judge's verdict", columns=5)
            strip = gr.Image(label="reverse process of the first image", type="numpy", format="png")
            verdict = gr.Markdown(elem_id="digits-note")
    inputs = [domain, digit, g_digit, g_domain, method, steps, eta, seed, count]
    go.click(endpoint(models, handlers.digits), inputs, [grid, strip, verdict], api_name="digits")


def ddim_tab(models: Models) -> None:
    with gr.Row():
        with gr.Column(scale=1, min_width=260):
            gr.Markdown("DDIM on the digits model, for one condition.")
            domain = gr.Radio(list(DOMAINS), value=DOMAINS[0], label="domain")
            digit = gr.Slider(0, 9, value=3, step=1, label="digit")
            guidance = gr.Slider(0, 15, value=3, step=0.5, label="guidance")
            steps = gr.Slider(1, 200, value=50, step=1, label="DDIM steps")
            with gr.Row():
                seed_a = gr.Number(value=0, precision=0, label="seed A")
                seed_b = gr.Number(value=1, precision=0, label="seed B")
            with gr.Accordion("or your own noise files (.pt)", open=False):
                noise_a = gr.File(label="noise A", file_types=[".pt"], type="filepath")
                noise_b = gr.File(label="noise B", file_types=[".pt"], type="filepath")
            alpha = gr.Slider(0, 1, value=0.5, step=0.05, label="α (A to B)")
            go = gr.Button("Sample", variant="primary", elem_id="ddim-go")
        with gr.Column(scale=2):
            etas = gr.Image(label="η = 0, 0.25, 0.5, 0.75, 1 from noise A", type="numpy", format="png")
            strips = gr.Image(label="lerp (top) and slerp (bottom), α = 0 ... 1", type="numpy", format="png")
            pair = gr.Image(label="at α: lerp, slerp", type="numpy", format="png")
            note = gr.Markdown(elem_id="ddim-note")
    views = endpoint(models, handlers.ddim_views)
    inputs = [domain, digit, guidance, seed_a, seed_b, noise_a, noise_b, steps, alpha]
    go.click(views, inputs, [etas, strips, pair, note], api_name="ddim")
    alpha.release(views, inputs, [etas, strips, pair, note], api_name=False)
    gr.Markdown("### Inversion")
    with gr.Row():
        with gr.Column(scale=1, min_width=260):
            image = gr.Image(
                label="an image (resized to the model's size)", type="numpy", format="png", elem_id="ddim-image"
            )
            invert = gr.Button("Invert and reconstruct", variant="primary", elem_id="invert-go")
        with gr.Column(scale=2):
            both = gr.Image(label="the image, its reconstruction from x_T", type="numpy", format="png")
            mse = gr.Markdown(elem_id="invert-note")
    invert.click(
        endpoint(models, handlers.ddim_invert), [domain, digit, guidance, image, steps], [both, mse], api_name="invert"
    )


def clip_tab(models: Models) -> None:
    with gr.Row():
        with gr.Column(scale=1, min_width=260):
            image = gr.Image(label="image", type="numpy", format="png", elem_id="clip-image")
            gr.Examples(example_digits(), inputs=[image], label="or pick a held-out digit")
            classes = gr.Textbox(DIGIT_NAMES, lines=2, label="class names (commas or one per line)")
            id2label = gr.File(label="or an id2label.json", file_types=[".json"], type="filepath")
            templates = gr.Textbox(TEMPLATES, lines=5, label="templates, one per line (the first alone vs all)")
            go = gr.Button("Classify", variant="primary", elem_id="clip-go")
        with gr.Column(scale=1):
            one = gr.Label(num_top_classes=5, label="one template")
            ensemble = gr.Label(num_top_classes=5, label="ensemble of the templates")
            note = gr.Markdown(elem_id="clip-note")
    go.click(
        endpoint(models, handlers.clip_top5),
        [image, classes, id2label, templates],
        [one, ensemble, note],
        api_name="clip",
    )


def personalize_tab(models: Models) -> None:
    with gr.Row():
        with gr.Column(scale=1, min_width=260):
            prompt = gr.Textbox("the number 3 in the style of <new1>", label="prompt (<new1>, <new2>: learned tokens)")
            score_text = gr.Textbox("the number 3", label="text for the CLIP text score")
            count = gr.Slider(1, 16, value=4, step=1, label="images")
            steps = gr.Slider(1, 100, value=25, step=1, label="steps")
            guidance = gr.Slider(0, 15, value=7.5, step=0.5, label="guidance")
            seed = gr.Number(value=0, precision=0, label="seed")
            go = gr.Button("Generate", variant="primary", elem_id="personalize-go")
        with gr.Column(scale=2):
            images = gallery("personalize-gallery", "images: CLIP image and text scores", columns=4)
            note = gr.Markdown(elem_id="personalize-note")
    go.click(
        endpoint(models, handlers.personalize),
        [prompt, score_text, count, steps, guidance, seed],
        [images, note],
        api_name="personalize",
    )
    gr.Markdown("### Two concepts in one image")
    with gr.Row():
        with gr.Column(scale=1, min_width=260):
            left = gr.Textbox("the number 3 in the style of <new1>", label="left concept")
            left_box = gr.Textbox("0,0,0.5,1", label="its box (left,top,right,bottom)")
            right = gr.Textbox("the number 5 in the style of <new2>", label="right concept")
            right_box = gr.Textbox("0.5,0,1,1", label="its box")
            compose = gr.Button("Compose", variant="primary", elem_id="compose-go")
        with gr.Column(scale=2):
            naive = gr.Image(label='naive prompt "LEFT next to RIGHT"', type="numpy", format="png")
            composed = gr.Image(label="composed: each box denoised with its own prompt", type="numpy", format="png")
            note2 = gr.Markdown(elem_id="compose-note")
    compose.click(
        endpoint(models, handlers.compose),
        [left, right, left_box, right_box, steps, guidance, seed],
        [naive, composed, note2],
        api_name="compose",
    )


def build_app(cfg: AppConfig) -> gr.Blocks:
    models = Models(cfg)
    with gr.Blocks(title="difflab", analytics_enabled=False) as app:
        gr.Markdown("# difflab\nDiffusion exercises on the embedded defaults: change a setting, watch the effect.")
        with gr.Tab("Digits"):
            digits_tab(models, cfg)
        with gr.Tab("DDIM"):
            ddim_tab(models)
        with gr.Tab("CLIP"):
            clip_tab(models)
        with gr.Tab("Personalize"):
            personalize_tab(models)
    return app.queue(default_concurrency_limit=1)


def serve(cfg: AppConfig, port: int = 7860, block: bool = True):
    """Serve on 127.0.0.1 only, no share link, no analytics; returns the local URL."""
    app = build_app(cfg)
    _, url, _ = app.launch(
        server_name="127.0.0.1",
        server_port=port,
        share=False,
        show_error=True,
        prevent_thread_lock=not block,
        css=CSS,
        footer_links=[],
        quiet=not block,
    )
    return app, url
