"""What one browser session of the web demo does, without Gradio (docs/design.md, "Web demo").

- :class:`SessionFolders`: one folder per session under a root, removed when the session ends or after a
  time without activity; nothing is written outside it.
- :class:`ConceptExpressDemo`: the demo's work on the shared pipeline (localize, extract, generate, the
  concept cards, the zip), one job at a time; a session's tokens are loaded only for its own generations.
- :func:`check_prompt`: a prompt's tokens against the session's concepts, with a clear message.

:mod:`diffusers_conceptexpress.web` builds the Gradio app on these.
"""

import logging
import os
import re
import shutil
import threading
import time
import zipfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import PIL.Image
import torch

from .atomic import atomic_file
from .image_io import ImageInput, load_image
from .learning import LearningConfig
from .outputs import ConceptExpressOutput, ConceptLocalization
from .pipeline import ConceptExpressPipeline
from .tokens import DEFAULT_TOKEN_PREFIX, concept_token_names

logger = logging.getLogger(__name__)

#: The zip a session downloads: the concept folder written by ``ConceptExpressOutput.save``.
ZIP_NAME = "conceptexpress-concepts.zip"
#: Name of the folder inside the zip (``load_textual_inversion("concepts/concepts.safetensors")``).
ZIP_FOLDER = "concepts"
# Gradio session hashes are short random strings; anything else is refused before it becomes a path.
_SESSION_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
_MIN_DISPLAY = 256  # small (toy) images are shown enlarged to at least this many pixels, pixels kept sharp


class SessionFolders:
    """One temporary folder per browser session under ``root``, removed after ``ttl`` idle seconds.

    A folder's last activity is its modification time (set on every :meth:`folder` call and by every file
    written in it). Folders of sessions with a job in progress (:meth:`active`) are never removed.

    Args:
        root: the parent of the session folders (created if missing). Nothing is written outside it.
        ttl: seconds without activity after which :meth:`sweep` removes a session's folder.
    """

    def __init__(self, root: str | os.PathLike, ttl: float = 3600.0) -> None:
        if ttl <= 0:
            raise ValueError(f"ttl must be positive, got {ttl}.")
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.ttl = float(ttl)
        self._lock = threading.Lock()
        self._active: dict[str, int] = {}

    def path(self, session: str) -> Path:
        """The folder of ``session`` (not created); ValueError for a name that is not a session id."""
        if not isinstance(session, str) or not _SESSION_NAME.fullmatch(session):
            raise ValueError(f"Invalid session id {session!r}.")
        return self.root / session

    def folder(self, session: str) -> Path:
        """The folder of ``session``, created if needed and marked as active now."""
        path = self.path(session)
        path.mkdir(exist_ok=True)
        os.utime(path)
        return path

    @contextmanager
    def active(self, session: str) -> Iterator[Path]:
        """The session's folder, protected from :meth:`sweep` and :meth:`remove` while the block runs."""
        path = self.folder(session)
        with self._lock:
            self._active[session] = self._active.get(session, 0) + 1
        try:
            yield path
        finally:
            with self._lock:
                self._active[session] -= 1
                if not self._active[session]:
                    del self._active[session]
            if path.is_dir():
                os.utime(path)

    def sessions(self) -> list[str]:
        """Names of the session folders that exist now."""
        return sorted(p.name for p in self.root.iterdir() if p.is_dir())

    def remove(self, session: str) -> bool:
        """Remove the folder of ``session`` now (unless a job of it is running); True if it was removed."""
        path = self.path(session)
        with self._lock:
            if session in self._active or not path.is_dir():
                return False
            shutil.rmtree(path, ignore_errors=True)
        return True

    def sweep(self, now: float | None = None) -> list[str]:
        """Remove the folders idle for more than ``ttl`` seconds at time ``now`` (default: now); returns
        their session names."""
        now = time.time() if now is None else now
        removed = []
        for name in self.sessions():
            path = self.root / name
            with self._lock:
                if name in self._active:
                    continue
                try:
                    idle = now - path.stat().st_mtime
                except FileNotFoundError:
                    continue
                if idle > self.ttl:
                    shutil.rmtree(path, ignore_errors=True)
                    removed.append(name)
        return removed


# ------------------------------------------------------------------------------------------ model work
@dataclass
class ConceptCard:
    """What the page shows of one learned concept."""

    token: str
    mask: PIL.Image.Image
    score: float | None
    prompt: str
    sample: PIL.Image.Image


def check_prompt(prompt: str, concepts: ConceptExpressOutput | None) -> str:
    """``prompt`` stripped, or ValueError when it is empty or names concept tokens this session lacks.

    Tokens are recognised by the session's prefix (``<ce>``): ``<ce>_7`` with three concepts is refused with
    the list of the tokens that exist, instead of silently generating from an unknown word.
    """
    prompt = (prompt or "").strip()
    if not prompt:
        raise ValueError("The prompt is empty; write one, e.g. 'a photo of <ce>_1'.")
    prefix = concepts.token_prefix if concepts is not None else DEFAULT_TOKEN_PREFIX
    used = re.findall(re.escape(prefix) + r"(?:_\d+)?", prompt)
    if used and concepts is None:
        raise ValueError(f"The prompt uses {used[0]}, but no concepts were extracted yet: extract first.")
    if concepts is not None:
        unknown = sorted(set(used) - {prefix, *concepts.tokens})
        if unknown:
            raise ValueError(
                f"Unknown token(s) {', '.join(unknown)}: this session's concepts are "
                f"{', '.join(concepts.tokens)} ({prefix} alone means all of them)."
            )
    return prompt


class ConceptExpressDemo:
    """The model work of the web demo on one shared pipeline: one job at a time, no state of its own.

    Every method takes what a session holds (its image, its concepts) and returns new values; the pipeline
    is left as it was found: concept tokens are loaded only for the duration of a generation (so the pipeline
    must not hold tokens of the prefix ``<ce>`` of its own: they would be replaced).

    Args:
        pipe: the pipeline every session shares.
        inference_steps, guidance: default sampling settings (cards' samples, generations).
        train_steps: default number of training steps.
    """

    def __init__(
        self,
        pipe: ConceptExpressPipeline,
        *,
        inference_steps: int = 50,
        guidance: float = 7.5,
        train_steps: int | None = None,
    ) -> None:
        self.pipe = pipe
        self.inference_steps = int(inference_steps)
        self.guidance = float(guidance)
        self.train_steps = int(train_steps or LearningConfig().num_train_steps)
        self._lock = threading.Lock()

    @staticmethod
    def read_image(path: str | os.PathLike, name: str | None = None) -> PIL.Image.Image:
        """The uploaded file at ``path`` as RGB, validated by :func:`~diffusers_conceptexpress.load_image`.

        The package's error is re-raised with the server-side path replaced by ``name`` (the file's own name).
        """
        try:
            return load_image(path)
        except (ValueError, OSError) as err:
            shown = name or Path(path).name
            raise type(err)(str(err).replace(str(path), shown)) from None

    @staticmethod
    def display(image: PIL.Image.Image) -> PIL.Image.Image:
        """``image`` as shown in the page: small (toy) images enlarged with sharp pixels."""
        from .visualize import enlarged

        return enlarged(image, _MIN_DISPLAY)

    def localize(self, image: ImageInput, *, seed: int = 0) -> ConceptLocalization:
        """:meth:`ConceptExpressPipeline.localize_concepts` on ``image`` (one job at a time)."""
        with self._lock:
            return self.pipe.localize_concepts(image, generator=torch.Generator().manual_seed(int(seed)))

    def overlay(
        self, image: PIL.Image.Image, localization: ConceptLocalization
    ) -> tuple[PIL.Image.Image, list[tuple[PIL.Image.Image, str]]]:
        """The overlay picture and a (mask, caption) pair per concept, for display."""
        from .visualize import overlay_masks

        tokens = concept_token_names(DEFAULT_TOKEN_PREFIX, localization.num_concepts)
        scores = localization.eot_scores.tolist()
        # the labels are drawn on the enlarged image, so they stay readable on a 64-pixel toy scene
        overlay = overlay_masks(self.display(image), localization.masks, tokens)
        masks = [
            (self.display(m), t if s != s else f"{t} · {s:.2f}")  # NaN: masks given by the user
            for t, m, s in zip(tokens, localization.masks, scores, strict=True)
        ]
        return overlay, masks

    def extract(
        self,
        image: ImageInput,
        *,
        steps: int,
        schedule: str,
        seed: int = 0,
        callback: Callable[[int, int, dict], None] | None = None,
        **options,
    ) -> ConceptExpressOutput:
        """:meth:`ConceptExpressPipeline.extract_concepts` with ``load=False`` (the shared pipeline gains no
        tokens), seeded by ``seed``; ``callback(step, steps, logs)`` after every training step; ``options``:
        more keyword options of ``extract_concepts``."""
        with self._lock:
            return self.pipe.extract_concepts(
                image,
                num_train_steps=int(steps),
                schedule=schedule,
                generator=torch.Generator().manual_seed(int(seed)),
                callback=callback,
                load=False,
                **options,
            )

    @contextmanager
    def _loaded(self, concepts: ConceptExpressOutput) -> Iterator[list[str]]:
        """The concepts' tokens loaded into the shared pipeline for the block only (under the lock)."""
        with self._lock:
            tokens = self.pipe.load_concepts(concepts)
            try:
                yield tokens
            finally:
                self.pipe.unload_concepts(concepts)

    def _generate(self, prompt: str, steps: int | None, guidance: float | None, seed: int) -> PIL.Image.Image:
        return self.pipe(
            prompt,
            num_inference_steps=int(steps or self.inference_steps),
            guidance_scale=float(self.guidance if guidance is None else guidance),
            generator=torch.Generator().manual_seed(int(seed)),
        ).images[0]

    def generate(
        self,
        concepts: ConceptExpressOutput | None,
        prompt: str,
        *,
        steps: int | None = None,
        guidance: float | None = None,
        seed: int = 0,
    ) -> PIL.Image.Image:
        """One image of ``prompt`` with the session's ``concepts`` (None: the bare model); the prompt is
        checked by :func:`check_prompt` first."""
        prompt = check_prompt(prompt, concepts)
        if concepts is None:
            with self._lock:
                return self._generate(prompt, steps, guidance, seed)
        with self._loaded(concepts):
            return self._generate(prompt, steps, guidance, seed)

    def cards(
        self,
        concepts: ConceptExpressOutput,
        directory: str | os.PathLike | None = None,
        *,
        steps: int | None = None,
        guidance: float | None = None,
        seed: int = 0,
        progress: Callable[[int, int], None] | None = None,
    ) -> list[ConceptCard]:
        """One card per concept: its mask, token, EOT score and a sample of its prompt alone ("a photo of
        <ce>_k", with the prompt template recorded in the saved concept ``directory`` when given);
        ``progress(k, K)`` after each sample."""
        from .evaluation import concept_prompts

        prompts = concept_prompts(concepts.tokens, directory)
        scores = concepts.localization.eot_scores.tolist()
        cards = []
        with self._loaded(concepts):
            for k, token in enumerate(concepts.tokens):
                sample = self._generate(prompts[k], steps, guidance, seed)
                mask = self.display(concepts.localization.masks[k].convert("L"))
                score = None if scores[k] != scores[k] else float(scores[k])  # NaN: masks given by the user
                cards.append(ConceptCard(token, mask, score, prompts[k], self.display(sample)))
                if progress is not None:
                    progress(k + 1, len(concepts.tokens))
        return cards

    @staticmethod
    def export(concepts: ConceptExpressOutput, folder: str | os.PathLike) -> Path:
        """Save the concepts into ``folder/concepts`` and zip that folder into ``folder/<ZIP_NAME>``.

        The zip holds ``concepts/concepts.safetensors`` (the stock loader's file), ``concept_k.safetensors``,
        the masks, the overlay, the source image and ``concepts.json``. Both are written atomically.
        """
        folder = Path(folder)
        directory = Path(concepts.save(str(folder / ZIP_FOLDER), overwrite=True))
        target = folder / ZIP_NAME
        with atomic_file(target) as handle, zipfile.ZipFile(handle, "w", zipfile.ZIP_DEFLATED) as archive:
            for file in sorted(directory.iterdir()):
                archive.write(file, f"{ZIP_FOLDER}/{file.name}")
        return target


# ------------------------------------------------------------------------------------------- the app
