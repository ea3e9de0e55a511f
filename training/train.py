"""Train the bundled model from nothing, seeded: scenes -> VQGAN -> codes -> DalleBart -> VQGAN decoder -> hub folders.

    python -m training.train --out DIR [--seed 0] [--scenes N] [--vqgan-steps N] [--settle-steps N]
                             [--flat-steps N] [--dallebart-steps N] [--guided-steps N] [--decode-steps N]
                             [--vqgan TRAINED] [--resume]

Writes DIR/vqgan and DIR/dallebart (config.json, flax_model.msgpack; the tokenizer files with the DalleBart)
and a loss log per stage and phase in DIR/logs, with a progress bar for each on the terminal. ``--vqgan`` takes
the VQGAN folder of an earlier run (encoder included) instead of the VQGAN's first phase; with ``--settle-steps 0
--flat-steps 0 --decode-steps 0`` the DalleBart stage runs alone on that VQGAN's codes, for trying its settings
without the VQGAN's share of the hour. Each phase saves into DIR/checkpoints (the DalleBart's every 250 steps); a
run cut off goes on from there when started again with the same arguments and ``--resume``.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import hashlib
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

from dalle_space import text
from dalle_space.config import DALLEBART_PRESETS, VQGAN_PRESETS
from training import dallebart_stage, data, devices, export, resume, vqgan_stage

# The bundled model's presets: what this trains is what the app ships as `tiny`. VQGAN: f4, a 16 x 16 grid
# of 4 x 4-pixel codes, 0.75 s per step of 16 pictures on 2 CPU cores; DalleBart: 0.74 s per step of 32 pairs.
VQGAN_CONFIG = VQGAN_PRESETS["tiny"]
DALLEBART_CONFIG = DALLEBART_PRESETS["tiny"]
RESOLUTION = VQGAN_CONFIG.resolution

# Captions per scene, each a pair of its own: most of the DalleBart's ~2.4 visits to a scene read a new wording.
CAPTION_ROUNDS = 4
# In the rounds after the first, the chance that a big shape's size and a lone shape's centre go unsaid, so
# "a red square on a blue background" means a big one in the middle (training/README.md, tenth run).
UNSAID_DEFAULTS = 0.5


class _Log:
    """Losses to a tab-separated file and the progress bar's postfix; resumed at step ``done``, the file keeps
    the lines of the steps before it and drops those of steps the run makes again."""

    def __init__(self, path: Path, bar: tqdm, columns: tuple[str, ...], done: int = 0):
        path.parent.mkdir(parents=True, exist_ok=True)
        kept = path.read_text().splitlines(keepends=True)[1:done + 1] if done and path.exists() else []
        self.file = path.open("w")
        self.file.write("step\t" + "\t".join(columns) + "\n" + "".join(kept))
        self.bar, self.columns = bar, columns

    def __call__(self, step: int, *values: float) -> None:
        self.file.write(f"{step}\t" + "\t".join(f"{v:.6f}" for v in values) + "\n")
        self.bar.update(1)
        self.bar.set_postfix({name: f"{v:.4f}" for name, v in zip(self.columns, values)}, refresh=False)

    def close(self) -> None:
        self.file.close()
        self.bar.close()


def _stage(name: str, steps: int, out: Path, columns: tuple[str, ...], done: int = 0) -> _Log:
    return _Log(out / "logs" / f"{name}.tsv", tqdm(total=steps, initial=done, desc=name, unit="step"), columns, done)


def _vqgan_phase(name: str, training, images: np.ndarray, seed: int, out: Path, saves: resume.Checkpoints,
                 settings: str, params=None):
    """One VQGAN phase with its progress bar and loss log, saved at its end; its trained parameters, read back
    instead where a ``--resume`` finds it saved."""
    saved = saves.load(name, settings)
    if saved is not None:
        return saved
    log = _stage(name, training.steps, out, ("loss", "reconstruction", "quantisation"))
    params = vqgan_stage.train(VQGAN_CONFIG, training, images, seed,
                               on_step=lambda step, loss, terms: log(step, loss, *terms), params=params)
    log.close()
    saves.save(name, settings, params)
    return params


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--scenes", type=int, default=20000, help="training scenes (pictures and captions)")
    parser.add_argument("--vqgan-steps", type=int, default=vqgan_stage.VQGANTraining.steps)
    parser.add_argument("--settle-steps", type=int, default=vqgan_stage.SETTLE.steps,
                        help="steps of the VQGAN's second phase, the first's objective at half its rate")
    parser.add_argument("--flat-steps", type=int, default=vqgan_stage.FLAT.steps,
                        help="steps of the VQGAN's third phase, flat cells held to their colour's code")
    parser.add_argument("--decode-steps", type=int, default=vqgan_stage.DECODE.steps,
                        help="steps of the VQGAN's last phase, its decoder alone on the DalleBart's codes")
    parser.add_argument("--dallebart-steps", type=int, default=dallebart_stage.PLAIN.steps,
                        help="steps of plain cross-entropy")
    parser.add_argument("--guided-steps", type=int, default=dallebart_stage.GUIDED.steps,
                        help="steps of the guided objective after them")
    parser.add_argument("--vqgan", type=Path, help="a trained VQGAN folder (OUT/vqgan of an earlier run) to use "
                                                   "instead of the VQGAN's first phase")
    parser.add_argument("--resume", action="store_true",
                        help="go on from the saves in OUT/checkpoints of a run of the same settings cut off part-way")
    args = parser.parse_args(argv)
    started = time.monotonic()
    saves = resume.Checkpoints(args.out / "checkpoints", args.resume)

    scenes = data.make_scenes(args.seed, args.scenes, RESOLUTION)
    settings = f"{args.scenes} scenes, seed {args.seed}"
    if args.vqgan:
        vq_params = export.read_vqgan(args.vqgan, VQGAN_CONFIG)
        settings += f", VQGAN {hashlib.sha256((args.vqgan / 'flax_model.msgpack').read_bytes()).hexdigest()[:12]}"
    else:
        training = dataclasses.replace(vqgan_stage.VQGANTraining(), steps=args.vqgan_steps)
        settings += f" -> vqgan {training}"
        vq_params = _vqgan_phase("vqgan", training, scenes.images, args.seed, args.out, saves, settings)
    later = [("vqgan_settle", vqgan_stage.SETTLE, args.settle_steps, 2),
             ("vqgan_flat", vqgan_stage.FLAT, args.flat_steps, 1)]
    for phase, training, steps, offset in later:  # each in a batch order of its own; a phase of 0 steps skipped
        if steps:
            training = dataclasses.replace(training, steps=steps)
            settings += f" -> {phase} {training}"
            vq_params = _vqgan_phase(phase, training, scenes.images, args.seed + offset, args.out, saves, settings,
                                     vq_params)
    codes = vqgan_stage.flat_codes(VQGAN_CONFIG, vq_params, scenes.images)

    folder = args.out / "dallebart"
    folder.mkdir(parents=True, exist_ok=True)
    said = scenes.captions + data.recaption(scenes, args.seed, CAPTION_ROUNDS - 1, UNSAID_DEFAULTS)
    text.write_tiny_tokenizer(folder, vocab_size=DALLEBART_CONFIG.encoder_vocab_size, extra_lines=said)
    tokenizer = text.load_tokenizer(folder)
    captions = text.encode_prompts(tokenizer, list(said), DALLEBART_CONFIG.max_text_length, None)
    pairs = dallebart_stage.Pairs(captions.input_ids, captions.attention_mask, np.tile(codes, (CAPTION_ROUNDS, 1)),
                                  *text.unconditional_ids(tokenizer, DALLEBART_CONFIG.max_text_length))
    phases = [("dallebart", dataclasses.replace(dallebart_stage.PLAIN, steps=args.dallebart_steps)),
              ("dallebart_guided", dataclasses.replace(dallebart_stage.GUIDED, steps=args.guided_steps))]
    params = None
    for offset, (phase, training) in enumerate(phases):  # each phase reads the pairs in an order of its own
        settings += f" -> {phase} {training}"
        fresh = dallebart_stage.begin(DALLEBART_CONFIG, training, args.seed + offset, params)
        saved = saves.load(phase, settings, fresh)
        progress = fresh if saved is None else saved
        log = _stage(phase, training.steps, args.out, ("loss",), done=int(progress.step))
        progress = dallebart_stage.train(DALLEBART_CONFIG, training, pairs, args.seed + offset, progress, on_step=log,
                                         save=functools.partial(saves.save, phase, settings))
        log.close()
        params = progress.params
    export.write_folder(folder, DALLEBART_CONFIG, export.checkpoint_tree(params))
    if args.decode_steps:  # last, since it changes no code the DalleBart reads
        training = dataclasses.replace(vqgan_stage.DECODE, steps=args.decode_steps)
        settings += f" -> vqgan_decode {training}"
        vq_params = _vqgan_phase("vqgan_decode", training, scenes.images, args.seed + 3, args.out, saves, settings,
                                 vq_params)
    export.write_folder(args.out / "vqgan", VQGAN_CONFIG, vq_params)
    print(f"wrote {args.out / 'vqgan'} and {folder} in {time.monotonic() - started:.0f} s")


if __name__ == "__main__":
    devices.use_cpu_cores()  # the process's own JAX, so set before anything runs on it
    main()
