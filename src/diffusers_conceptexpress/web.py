"""The web demo (``conceptexpress serve``): a Gradio app over the package's public API.

The flow of a browser session: an image (uploaded, or a toy scene drawn with one click) -> localize (the
overlay and each concept's mask with its EOT score) -> extract with the chosen steps and schedule (a live
progress bar) -> one card per concept (mask, token, a sample) -> a prompt with the tokens -> generate ->
the concept folder as a zip, ready for ``load_textual_inversion``.

Sessions (docs/design.md, "Web demo"):

- ONE pipeline is shared by every session. The jobs that use it (localize, extract, generate) are queued
  (one Gradio concurrency group of size 1) and also run under a lock, so they never overlap.
- Concepts are extracted with ``load=False``: a session's tokens live in its own state and are loaded into the
  shared pipeline only for its own generations, then unloaded (:meth:`ConceptExpressDemo.generate`), so no
  session ever sees another's tokens.
- Everything the app writes lives under one temporary root (:class:`WebDemo`): ``sessions/<session>/`` per
  browser session (:class:`SessionFolders`) and ``gradio/``, Gradio's own cache (uploads, served images).
  A session's folder goes when its tab closes, or after ``session_ttl`` seconds without activity; the
  root goes when the server stops.
- A bad upload (not an image, too small) shows the package's own error in the page; the session keeps its
  previous image and the app keeps working.

Gradio is an optional dependency (``pip install "diffusers-conceptexpress[web]"``): it is imported only when
the app is built, so everything else in this module (and the package) works without it.
"""

# No `from __future__ import annotations` here: Gradio finds the `request: gr.Request` parameters of the
# event handlers by their evaluated annotations, and `gr` is imported only inside `WebDemo._build`.
import inspect
import logging
import os
import shutil
import tempfile
import time
from contextlib import contextmanager, suppress
from pathlib import Path

import torch

from .learning import SCHEDULES, LearningConfig
from .pipeline import ConceptExpressPipeline
from .web_session import ZIP_FOLDER, ZIP_NAME, ConceptCard, ConceptExpressDemo, SessionFolders, check_prompt

__all__ = [
    "DEFAULT_HOST",
    "DEFAULT_PORT",
    "ZIP_NAME",
    "ConceptCard",
    "ConceptExpressDemo",
    "SessionFolders",
    "WebDemo",
    "check_prompt",
    "require_gradio",
    "serve",
]

logger = logging.getLogger(__name__)

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 7860


def require_gradio():
    """Import and return ``gradio``, or raise ImportError saying how to install the web extra."""
    try:
        import gradio
    except ImportError as err:
        raise ImportError(
            'The web demo needs Gradio: pip install "diffusers-conceptexpress[web]" '
            f"(could not import gradio: {err})."
        ) from None
    return gradio


# ---------------------------------------------------------------------------------------------- sessions
_CSS = """
.ce-card {border: 1px solid var(--border-color-primary); border-radius: var(--radius-lg); padding: 8px;}
#ce-cards {flex-wrap: wrap;}
"""

_INTRO = """# ConceptExpress
Find the concepts of ONE image with no words, no masks and no concept count, and learn one textual-inversion
token per concept ([ConceptExpress](https://arxiv.org/abs/2407.07077), ECCV 2024).
Upload an image or draw a toy scene, find its concepts, learn one token per concept, generate with the
tokens, and download the concepts: any Stable Diffusion pipeline of the same model loads them with
`pipe.load_textual_inversion("concepts/concepts.safetensors")`."""


def _load_pipeline(model: str | None, device: str | None, dtype: str) -> ConceptExpressPipeline:
    from .cli import DTYPES

    if dtype not in DTYPES:
        raise ValueError(f"Unknown dtype {dtype!r}; choose one of {sorted(DTYPES)}.")
    if model is None:
        from .toyworld import model_path

        model = model_path()
    pipe = ConceptExpressPipeline.from_pretrained(model, dtype=DTYPES[dtype])
    return pipe.to(device or ("cuda" if torch.cuda.is_available() else "cpu"))


class WebDemo:
    """The Gradio app of the web demo. ``WebDemo().launch()`` serves it; :meth:`close` stops it and removes
    everything it wrote.

    Everything the app writes goes under one new temporary root (``root``): ``sessions/<session>/`` per
    browser session (:class:`SessionFolders`; the concept folder and its zip) and ``gradio/``, Gradio's cache
    (the app sets ``GRADIO_TEMP_DIR`` there while it exists; files older than ``session_ttl`` are deleted).

    Args:
        model: a diffusers folder or model id, a built :class:`ConceptExpressPipeline` (shared as is), or None:
            the shipped toy model (offline).
        device: "cpu", "cuda", ... (default: cuda if available); dtype: "float32", "float16" or "bfloat16".
            Both ignored for a built pipeline.
        temp_dir: where the temporary root is created (default: the system's temporary folder).
        session_ttl: seconds without activity after which a session's folder is removed.
        inference_steps, guidance: the default sampling settings of the page (samples and generations);
            default: the toy model's 25 and 5.0 for the toy model, else 50 and 7.5 (as the command line).
        train_steps: the default number of training steps of the page (LearningConfig's 500).
    """

    def __init__(
        self,
        model: str | ConceptExpressPipeline | None = None,
        *,
        device: str | None = None,
        dtype: str = "float32",
        temp_dir: str | os.PathLike | None = None,
        session_ttl: float = 3600.0,
        inference_steps: int | None = None,
        guidance: float | None = None,
        train_steps: int | None = None,
    ) -> None:
        gr = require_gradio()
        from .cli import GUIDANCE, INFERENCE_STEPS
        from .toyworld import GENERATION_STEPS, GUIDANCE_SCALE
        from .toyworld import model_path as toy_model_path

        pipe = model if isinstance(model, ConceptExpressPipeline) else _load_pipeline(model, device, dtype)
        pipe.set_progress_bar_config(disable=True)  # the page shows the progress; the log stays readable
        toy = model is None or (
            isinstance(model, str | os.PathLike) and Path(model).resolve() == Path(toy_model_path()).resolve()
        )
        self.engine = ConceptExpressDemo(
            pipe,
            inference_steps=inference_steps or (GENERATION_STEPS if toy else INFERENCE_STEPS),
            guidance=guidance or (GUIDANCE_SCALE if toy else GUIDANCE),
            train_steps=train_steps,
        )
        self.toy = toy
        self.root = Path(tempfile.mkdtemp(prefix="conceptexpress-web-", dir=temp_dir))
        self._gradio_dirs_made: list[Path] = []
        self._previous_gradio_dir = os.environ.get("GRADIO_TEMP_DIR")
        try:
            self.sessions = SessionFolders(self.root / "sessions", ttl=session_ttl)
            os.environ["GRADIO_TEMP_DIR"] = str(self.root / "gradio")  # read by Gradio when blocks are built
            # Gradio >= 6.31 makes <its import-time temp dir>/gradio/vibe_edit_history (when the blocks are built
            # or served), whatever GRADIO_TEMP_DIR says later: note what did not exist, for close() to remove
            self._gradio_dirs_made = [d for d in _gradio_default_dirs() if not d.exists()]
            self.blocks = self._build(gr)
        except BaseException:
            self._remove_root()
            raise

    # ------------------------------------------------------------------ serving
    def launch(
        self,
        host: str | None = DEFAULT_HOST,
        port: int | None = DEFAULT_PORT,
        *,
        block: bool = True,
        **kwargs,
    ) -> str:
        """Serve the app on ``host``:``port`` (None: Gradio's defaults and its GRADIO_SERVER_NAME/PORT
        variables, as on a Hugging Face Space). ``block=False`` returns at once. Returns the local URL.
        ``kwargs`` go to ``gradio.Blocks.launch``."""
        options = {"css": _CSS, "max_file_size": "50mb", "show_error": True, "quiet": True}
        if "run_history" in inspect.signature(self.blocks.launch).parameters:  # Gradio 6.x's later releases
            options["run_history"] = False  # would keep every run in the browser (or a Hub bucket)
        options.update(kwargs)
        self._gradio_dirs_made += [d for d in _gradio_default_dirs() if not d.exists()]  # (see __init__)
        self.blocks.launch(server_name=host, server_port=port, prevent_thread_lock=not block, **options)
        return self.blocks.local_url

    def close(self) -> None:
        """Stop the server (if running) and remove the temporary root with every session's files."""
        try:
            self.blocks.close()
        finally:
            self._remove_root()

    def _remove_root(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)
        for folder in self._gradio_dirs_made:  # innermost first; only if empty (another app may use them)
            with suppress(OSError):
                folder.rmdir()
        if os.environ.get("GRADIO_TEMP_DIR") == str(self.root / "gradio"):
            if self._previous_gradio_dir is None:
                os.environ.pop("GRADIO_TEMP_DIR", None)
            else:
                os.environ["GRADIO_TEMP_DIR"] = self._previous_gradio_dir

    # ------------------------------------------------------------------ the page
    def _build(self, gr):
        import html

        from .cli import DEMO_SCENE  # the first toy scene shown: `conceptexpress demo`'s
        from .evaluation import concept_prompts
        from .toyworld import render_scene

        engine, sessions = self.engine, self.sessions

        def one_line(err: Exception) -> str:
            """The error's message as the page shows it: its first line, HTML-escaped (``<ce>_1`` stays)."""
            message = str(err).splitlines()[0] if str(err) else type(err).__name__
            logger.info("web demo: %s", message)
            return html.escape(message, quote=False)

        @contextmanager
        def shown_in_page():
            """Any error becomes one clear line in an error box of the page (the package's message) and on the
            event's outputs; nothing of the session changes, and the app goes on."""
            try:
                yield
            except gr.Error:
                raise
            except Exception as err:
                raise gr.Error(one_line(err), duration=None, print_exception=False) from None

        def session_of(request) -> str:
            return request.session_hash

        def needs_image(image):
            if image is None:
                raise gr.Error("Upload an image or draw a toy scene first.", duration=None)

        def on_upload(path, current, request: gr.Request):
            """A refused file leaves the session's image as it was and says why under it."""
            if path is None:
                return gr.skip(), gr.skip(), gr.skip(), gr.skip(), gr.skip()
            name = Path(path).name
            try:
                sessions.folder(session_of(request))
                image = engine.read_image(path)
            except Exception as err:
                kept = " The image above is kept." if current is not None else ""
                refused = f"**Not used: {html.escape(name)}.** {one_line(err)}{kept}"
                return gr.skip(), gr.skip(), refused, gr.skip(), gr.skip()
            caption = f"`{name}`: {image.width} x {image.height} pixels"
            return image, engine.display(image), caption, None, []

        def on_scene(seed, objects, request: gr.Request):
            with shown_in_page():
                sessions.folder(session_of(request))
                scene = render_scene(int(seed), num_objects=int(objects))
            caption = f"Toy scene {int(seed)}: {scene.caption}"
            return scene.image, engine.display(scene.image), caption, None, []

        def on_localize(image, seed, request: gr.Request):
            needs_image(image)
            with shown_in_page(), sessions.active(session_of(request)):
                sessions.sweep()
                localization = engine.localize(image, seed=seed)
                return engine.overlay(image, localization)

        def on_extract(
            image,
            steps,
            schedule,
            seed,
            sample_steps,
            guidance,
            request: gr.Request,
            progress=gr.Progress(),  # noqa: B008 (how Gradio attaches its progress bar)
        ):
            needs_image(image)
            start = time.perf_counter()
            with shown_in_page(), sessions.active(session_of(request)) as folder:
                sessions.sweep()
                progress(0, desc="Finding the concepts")

                def learning_step(step, total, logs):
                    progress((step + 1, total), desc="Learning the concepts", unit="steps")

                def sample_drawn(k, total):
                    progress((k, total), desc="Drawing a sample of each concept", unit="samples")

                concepts = engine.extract(
                    image, steps=steps, schedule=schedule, seed=seed, callback=learning_step
                )
                archive = engine.export(concepts, folder)
                directory = folder / ZIP_FOLDER
                cards = engine.cards(
                    concepts,
                    directory,
                    steps=sample_steps,
                    guidance=guidance,
                    seed=seed,
                    progress=sample_drawn,
                )
                overlay, masks = engine.overlay(image, concepts.localization)
                prompts = concept_prompts(concepts.tokens, directory)
            tokens = ", ".join(f"`{t}`" for t in concepts.tokens)
            status = (
                f"Learned {concepts.num_concepts} concept(s) in {time.perf_counter() - start:.1f} s "
                f"({int(steps)} steps, {schedule}): {tokens}; `{concepts.token_prefix}` alone means all of them."
            )
            info = (
                f"Your tokens: {', '.join(concepts.tokens)} ({concepts.token_prefix} = all of them), "
                "e.g. 'a photo of " + concepts.tokens[0] + " in the snow'."
            )
            return (
                concepts,
                cards,
                overlay,
                masks,
                status,
                gr.Textbox(value=prompts[-1], info=info),
                gr.DownloadButton(value=str(archive), interactive=True),
            )

        def on_generate(concepts, prompt, sample_steps, guidance, seed, request: gr.Request):
            with shown_in_page(), sessions.active(session_of(request)):
                sessions.sweep()
                image = engine.generate(concepts, prompt, steps=sample_steps, guidance=guidance, seed=seed)
            return engine.display(image)

        def on_unload(request: gr.Request):
            with suppress(ValueError):  # not a session id: nothing of ours to remove
                sessions.remove(session_of(request))

        def inserter(token: str):
            def insert(prompt: str) -> str:
                return f"{(prompt or '').rstrip()} {token}".strip()

            return insert

        heavy = {"concurrency_id": "model", "concurrency_limit": 1}  # one job at a time on the shared model
        shown = {"interactive": False, "format": "png"}  # images the app shows: lossless, exactly as made
        with gr.Blocks(
            title="ConceptExpress", analytics_enabled=False, delete_cache=(600, int(sessions.ttl))
        ) as blocks:
            image_state = gr.State(None)
            concepts_state = gr.State(None)
            cards_state = gr.State([])
            gr.Markdown(_INTRO)
            with gr.Row():
                with gr.Column():
                    gr.Markdown("### 1. An image")
                    upload = gr.File(label="Upload an image", type="filepath", elem_id="ce-upload")
                    with gr.Row():
                        scene_seed = gr.Number(
                            value=DEMO_SCENE,
                            precision=0,
                            label="Toy scene number",
                            elem_id="ce-scene-seed",
                        )
                        scene_objects = gr.Slider(
                            1, 3, value=2, step=1, label="Objects in the scene", elem_id="ce-scene-objects"
                        )
                    scene_btn = gr.Button("Draw a toy scene", elem_id="ce-scene")
                with gr.Column():
                    image_view = gr.Image(label="Your image", elem_id="ce-image", **shown)
                    image_caption = gr.Markdown(elem_id="ce-image-caption")
            gr.Markdown("### 2. Find the concepts")
            localize_btn = gr.Button("Find the concepts", variant="primary", elem_id="ce-localize")
            with gr.Row():
                overlay_view = gr.Image(label="Concepts found", elem_id="ce-overlay", **shown)
                masks_view = gr.Gallery(
                    label="Each concept's mask · EOT score (how salient; > 1 is kept)",
                    format="png",
                    columns=3,
                    fit_columns=False,  # a single mask keeps a third of the width
                    height=320,
                    elem_id="ce-masks",
                )
            gr.Markdown("### 3. Learn one token per concept")
            with gr.Row():
                steps = gr.Slider(
                    1, 1000, value=engine.train_steps, step=1, label="Training steps", elem_id="ce-steps"
                )
                schedule = gr.Radio(
                    list(SCHEDULES), value=LearningConfig.schedule, label="Schedule", elem_id="ce-schedule"
                )
                seed = gr.Number(value=0, precision=0, label="Seed", elem_id="ce-seed")
            with gr.Row():
                sample_steps = gr.Slider(
                    1,
                    100,
                    value=engine.inference_steps,
                    step=1,
                    label="Sampling steps",
                    elem_id="ce-sample-steps",
                )
                guidance = gr.Slider(
                    1.0, 15.0, value=engine.guidance, step=0.5, label="Guidance scale", elem_id="ce-guidance"
                )
            extract_btn = gr.Button("Extract the concepts", variant="primary", elem_id="ce-extract")
            extract_status = gr.Markdown("No concepts yet.", min_height=60, elem_id="ce-extract-status")

            @gr.render(inputs=cards_state)
            def show_cards(cards):
                if not cards:
                    return
                with gr.Row(elem_id="ce-cards"):
                    for card in cards:
                        with gr.Column(elem_classes=["ce-card"], min_width=180):
                            score = "" if card.score is None else f" · EOT score {card.score:.2f}"
                            gr.Markdown(f"**`{card.token}`**{score}", elem_classes=["ce-card-token"])
                            gr.Image(card.mask, label=f"Mask of {card.token}", **shown)
                            gr.Image(card.sample, label=card.prompt, **shown)
                            insert = gr.Button(f"Insert {card.token}", size="sm", elem_classes=["ce-insert"])
                            insert.click(
                                inserter(card.token), prompt, prompt, queue=False, api_visibility="private"
                            )

            gr.Markdown("### 4. Generate with your concepts")
            with gr.Row():
                prompt = gr.Textbox(
                    label="Prompt",
                    placeholder="a photo of <ce>_1 in the snow",
                    info="Extract concepts first: their tokens appear here.",
                    elem_id="ce-prompt",
                    scale=4,
                )
                gen_seed = gr.Number(value=0, precision=0, label="Seed", elem_id="ce-gen-seed", scale=1)
            generate_btn = gr.Button("Generate", variant="primary", elem_id="ce-generate")
            generated = gr.Image(label="Generated", elem_id="ce-generated", **shown)
            gr.Markdown("### 5. Take the concepts with you")
            download = gr.DownloadButton(
                "Download the concepts (.zip)", value=None, interactive=False, elem_id="ce-download"
            )

            image_outputs = [image_state, image_view, image_caption, overlay_view, masks_view]
            generate_inputs = [concepts_state, prompt, sample_steps, guidance, gen_seed]
            hidden = {"api_visibility": "private"}  # page mechanics, not part of the app's API
            # the upload box is emptied after every upload, taken or refused, ready for the next file
            upload.upload(
                on_upload, [upload, image_state], image_outputs, concurrency_limit=8, api_name="upload"
            ).then(lambda: None, None, upload, queue=False, **hidden)
            scene_btn.click(
                on_scene,
                [scene_seed, scene_objects],
                image_outputs,
                concurrency_limit=8,
                api_name="toy_scene",
            )
            localize_btn.click(
                on_localize, [image_state, seed], [overlay_view, masks_view], api_name="localize", **heavy
            )
            extract_btn.click(
                on_extract,
                [image_state, steps, schedule, seed, sample_steps, guidance],
                [concepts_state, cards_state, overlay_view, masks_view, extract_status, prompt, download],
                show_progress_on=[extract_status],
                api_name="extract",
                **heavy,
            )
            generate_btn.click(on_generate, generate_inputs, [generated], api_name="generate", **heavy)
            # a schedule brings its own step count (turbo: 150); the page's default stays with the default one
            schedule.change(
                lambda name: gr.update(
                    value=engine.train_steps
                    if name == LearningConfig.schedule
                    else LearningConfig(schedule=name).num_train_steps
                ),
                [schedule],
                [steps],
                queue=False,
                **hidden,
            )
            prompt.submit(on_generate, generate_inputs, [generated], **hidden, **heavy)
            blocks.load(lambda: sessions.sweep() and None, None, None, queue=False, **hidden)
            blocks.unload(on_unload)
        blocks.queue(default_concurrency_limit=8)
        return blocks


def _gradio_default_dirs() -> list[Path]:
    """Folders a Gradio server may create under Gradio's temp dir as read when Gradio was imported, innermost
    first."""
    try:
        from gradio.route_utils import DEFAULT_TEMP_DIR
    except ImportError:  # another Gradio layout: nothing known to clean
        return []
    return [Path(DEFAULT_TEMP_DIR) / "vibe_edit_history", Path(DEFAULT_TEMP_DIR)]


def serve(
    model: str | None = None,
    host: str = DEFAULT_HOST,
    port: int = DEFAULT_PORT,
    *,
    device: str | None = None,
    dtype: str = "float32",
    **options,
) -> None:
    """Serve the web demo until interrupted, then remove everything it wrote (``conceptexpress serve``).

    ``model`` None serves the shipped toy model (offline). ``options`` go to :class:`WebDemo`.
    """
    demo = WebDemo(model, device=device, dtype=dtype, **options)
    try:
        url = demo.launch(host, port, block=False)
        print(f"ConceptExpress web demo on {url} (model: {model or 'the shipped toy model'})", flush=True)
        print(f"Temporary files under {demo.root} (removed on exit); Ctrl-C stops the server.", flush=True)
        demo.blocks.block_thread()
    finally:
        demo.close()
