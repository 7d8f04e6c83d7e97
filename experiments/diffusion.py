"""Merging text-to-image diffusion models in miniature: the paper's bilingual JSDXL
merge (issue 14), on scikit-learn's 8x8 digits.

    python experiments/diffusion.py --runs 4 --out experiments/results/diffusion

Captions describe each digit image in two vocabularies, EN and JA
(m2n2_jax/tasks/captions.py). Four seed text-to-image models
(experiments/diffusion_models.py, trained once and cached): en-base, en-long,
en-thick, all reading EN captions, and ja, which reads JA captions with its own text
encoder and is weaker at image quality. Only the denoisers are merged, the JA text
encoder is kept, and the fitness is computed on JA captions only
(experiments/diffusion_protocol.py).

Writes OUT/diffusion.json: for each metric (`test_ncs`, `fid`, `digit_accuracy`,
`en_test_ncs`, `en_fid`, `en_digit_accuracy`, `cross_lingual`) a map method ->
{`mean`, `stderr`, `runs`}, with the settings, curves, chosen coefficients and wall
times; OUT/diffusion_samples.png (the same JA and EN prompts and noise for every
method; the images, in [-1, 1], in OUT/diffusion_samples.npz under "method/lang") and
OUT/diffusion_bars.png. Every value is checked before any work; a refused
or failed run writes nothing.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time

# Run as a file, sys.path[0] is experiments/: the repository root replaces it, so that each module here has
# one name, experiments.NAME (a bare `import harness` fails instead of loading a second copy).
if not __package__:
    sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

from experiments import harness

harness.use_cpu_devices(single_threaded_ops=True)

import jax
import numpy as np

from experiments import diffusion_protocol as dp
from experiments.diffusion_models import CACHE, Training
from experiments.harness import AT_LEAST_2, NON_NEGATIVE, POSITIVE, flag
from experiments.methods import method_name
from m2n2_jax.tasks import captions

MODEL = "model / training (experiments/diffusion_models.py)"


@dataclasses.dataclass(frozen=True)
class Spec:
    """The command line of experiments/diffusion.py (a contract)."""

    runs: int = flag(4, "independent runs (seeds) of every evolutionary method and of DARE", POSITIVE)
    forward_passes: int = flag(500, "evaluations per run of each evolutionary method, seeds included", POSITIVE)
    seed: int = flag(42, "first seed; runs use seed .. seed+runs-1")
    out: str = flag("experiments/results/diffusion", "output directory", result=False)
    methods: tuple[str, ...] = flag(dp.METHODS, "methods to run besides the seeds (default: all)", nargs="+",
                                    type=method_name)
    archive_size: int = flag(20, "M2N2 archive size", AT_LEAST_2)
    warmup: int = flag(50, "M2N2's first steps that merge random archive members (paper: at most 50)", NON_NEGATIVE)
    population: int = flag(20, "CMA-ES population", AT_LEAST_2)
    std_init: float = flag(0.2, "CMA-ES initial step size over the task-vector weights", POSITIVE)
    train_captions: int = flag(200, "JA training captions the fitness is computed on (paper: 2,000)", AT_LEAST_2)
    sampling_steps: int = flag(15, "DDIM steps per image", POSITIVE)
    log_every: int = flag(50, "log the curves every this many passes", POSITIVE)
    data_seed: int = flag(0, "seed of the models' training, the captions chosen and the noise", NON_NEGATIVE)
    cache: str = flag(CACHE, "where the trained models are kept (orbax)", result=False)
    no_progress: bool = flag(False, "no progress bar", result=False)
    hidden: int = flag(Training.hidden, MODEL, POSITIVE)
    batch: int = flag(Training.batch, MODEL, POSITIVE)
    classifier_steps: int = flag(Training.classifier_steps, MODEL, POSITIVE)
    base_steps: int = flag(Training.base_steps, MODEL, POSITIVE)
    long_steps: int = flag(Training.long_steps, MODEL, POSITIVE)
    thick_steps: int = flag(Training.thick_steps, MODEL, POSITIVE)
    ja_steps: int = flag(Training.ja_steps, MODEL, POSITIVE)

    def training(self) -> Training:
        """The seed models' settings (their cache key)."""
        return harness.settings_of(Training, self, seed=self.data_seed)

    def __post_init__(self):
        unknown = sorted(set(self.methods) - set(dp.METHODS))
        if unknown:
            raise ValueError(f"unknown --methods {unknown}; choose from {', '.join(dp.METHODS)}")
        if len(set(self.methods)) != len(self.methods):
            raise ValueError("--methods must not repeat a name")
        if self.forward_passes < 4 + self.population:
            raise ValueError(f"--forward-passes must be >= 4 seeds + --population ({4 + self.population}), "
                             f"got {self.forward_passes}")
        if self.train_captions > 1437:
            raise ValueError(f"--train-captions must be at most the 1,437 training images, got {self.train_captions}")
        for name in ("out", "cache"):
            path = getattr(self, name)
            if os.path.exists(path) and not os.path.isdir(path):
                raise ValueError(f"--{name} {path} exists and is not a directory")


def summarise(per_run: dict) -> dict:
    """{metric: {method: {"mean", "stderr", "runs"}}} of per_run[method] = [{metric: value}]."""
    out = {}
    for metric in dp.METRICS:
        out[metric] = {}
        for method, runs in per_run.items():
            values = np.asarray([r[metric] for r in runs], np.float64)
            out[metric][method] = {"mean": float(values.mean()), "stderr": float(harness.stderr(values)),
                                   "runs": values.tolist()}
    return out


def sample_prompts(test: dict) -> np.ndarray:
    """Indices of the first test image of each digit (the grid's columns)."""
    labels = np.asarray(test["labels"])
    return np.asarray([int(np.flatnonzero(labels == d)[0]) for d in range(10)])


def plot_samples(path: str, images: dict, prompts: dict) -> None:
    """One row per method and language: images[method][lang] (10, 64) in [-1, 1]."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [(m, lang) for m in images for lang in ("ja", "en")]
    fig, axes = plt.subplots(len(rows), 10, figsize=(8, 0.85 * len(rows) + 0.8), squeeze=False)
    for r, (method, lang) in enumerate(rows):
        for c in range(10):
            ax = axes[r, c]
            ax.imshow(np.asarray(images[method][lang][c]).reshape(8, 8), cmap="gray_r", vmin=-1, vmax=1)
            ax.set_xticks([]), ax.set_yticks([])
            if r < 2:
                ax.set_title(prompts[rows[r][1]][c], fontsize=5)
        axes[r, 0].set_ylabel(f"{method}\n{lang.upper()}", fontsize=6, rotation=0, ha="right", va="center")
    fig.suptitle("The same prompts (JA rows, EN rows) and noise for every method (run 0)", fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.35 / fig.get_figheight()))
    harness.save_figure(fig, path, dpi=100)


def plot_bars(path: str, summary: dict, runs: int) -> None:
    """test_ncs, fid and cross_lingual per method, mean ± stderr."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = (("test_ncs", "JA test similarity (higher is better)"), ("fid", "Fréchet distance (lower is better)"),
              ("en_test_ncs", "EN test similarity, never scored"), ("cross_lingual", "cross-lingual consistency"))
    methods = list(summary["test_ncs"])
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 0.28 * len(methods) + 1.5), sharey=True)
    for ax, (metric, title) in zip(axes, panels):
        means = [summary[metric][m]["mean"] for m in methods]
        errs = [summary[metric][m]["stderr"] for m in methods]
        colors = ["tab:red" if m == "m2n2" else "tab:gray" if m.startswith("seed") else "tab:blue" for m in methods]
        ax.barh(range(len(methods)), means, xerr=errs, color=colors)
        lo, hi = min(means), max(means)
        ax.set_xlim(max(0.0, lo - 0.15 * (hi - lo + 1e-9)), hi + 0.1 * (hi - lo + 1e-9))
        ax.set_title(title, fontsize=9)
    axes[0].set_yticks(range(len(methods)), methods, fontsize=7)
    axes[0].invert_yaxis()
    fig.suptitle(f"Bilingual diffusion merge, held-out images (mean ± stderr over {runs} runs)", fontsize=10)
    fig.tight_layout()
    harness.save_figure(fig, path, dpi=130)


def main(argv=None) -> dict:
    spec = harness.parse(Spec, __doc__, argv)
    t_start = time.perf_counter()
    p = dp.prepare(spec)
    t_trained = time.perf_counter()
    evaluate, images = dp.evaluator(p), dp.generator(p)
    encoders, denoisers = p.models["encoders"], p.models["denoisers"]
    columns = sample_prompts(p.test)
    prompts = {lang: [captions.text(t) for t in np.asarray(p.test[lang])[columns]] for lang in ("ja", "en")}

    def grid_images(denoiser, encoder):
        return {lang: np.asarray(images(denoiser, encoder, p.test[lang][columns], p.test["noise"][columns]))
                for lang in ("ja", "en")}

    per_run, wall, curves, coefficients, samples = {}, {}, {}, {}, {}
    for name in dp.SEEDS:
        seed = name.removeprefix("seed-")
        encoder = encoders["ja" if seed == "ja" else "en"]
        per_run[name] = [evaluate(denoisers[seed], encoder)] * spec.runs
        samples[name] = grid_images(denoisers[seed], encoder)
    keys = harness.run_keys(spec.seed, spec.runs)
    for name in spec.methods:
        t = time.perf_counter()
        if name in dp.OPERATORS:
            found = [dp.best_static(name, p, jax.random.fold_in(k, 1)) for k in (keys if name == "dare" else keys[:1])]
            found = found * (spec.runs // len(found))
            models, coefficients[name] = [f[0] for f in found], [f[1] for f in found]
        else:
            result, models = dp.run_evolutionary(name, p, spec)
            curves[name] = {"forward_passes": result.passes.tolist(),
                            "test_ncs_mean": result.metrics["test_ncs"].mean(0).tolist(),
                            "train_ncs_mean": result.metrics["train_ncs"].mean(0).tolist()}
        per_run[name] = [evaluate(m, encoders["ja"]) for m in models]
        samples[name] = grid_images(models[0], encoders["ja"])
        wall[name] = time.perf_counter() - t
        print(f"{name}: JA test similarity {np.mean([r['test_ncs'] for r in per_run[name]]):.4f}, "
              f"FD {np.mean([r['fid'] for r in per_run[name]]):.2f} ({wall[name]:.0f} s)")

    summary = summarise(per_run)
    os.makedirs(spec.out, exist_ok=True)
    np.savez_compressed(os.path.join(spec.out, "diffusion_samples.npz"),
                        **{f"{m}/{lang}": x for m, by_lang in samples.items() for lang, x in by_lang.items()})
    plot_samples(os.path.join(spec.out, "diffusion_samples.png"), samples, prompts)
    plot_bars(os.path.join(spec.out, "diffusion_bars.png"), summary, spec.runs)
    record = {
        "experiment": "diffusion",
        **summary,
        "methods": list(summary["test_ncs"]),
        "runs": spec.runs,
        "seeds": list(range(spec.seed, spec.seed + spec.runs)),
        "forward_passes": spec.forward_passes,
        "settings": harness.result_fields(spec),
        "training": dataclasses.asdict(p.training),
        "train_captions": spec.train_captions,
        "test_images": int(len(p.test["labels"])),
        "curves": curves,
        "coefficients": coefficients,
        "sample_prompts": prompts,
        "wall_seconds": {"training_or_cache": t_trained - t_start, **wall, "total": time.perf_counter() - t_start},
    }
    harness.write_json(os.path.join(spec.out, "diffusion.json"), record)
    print(f"\n{'method':<20} {'JA ncs':>7} {'FD':>7} {'digit':>6} {'EN ncs':>7} {'EN FD':>7} {'cross':>6}"
          f"   (test, {spec.runs} runs)")
    for m in summary["test_ncs"]:
        v = {k: summary[k][m]["mean"] for k in dp.METRICS}
        print(f"{m:<20} {v['test_ncs']:>7.4f} {v['fid']:>7.2f} {100 * v['digit_accuracy']:>5.1f}% "
              f"{v['en_test_ncs']:>7.4f} {v['en_fid']:>7.2f} {v['cross_lingual']:>6.4f}")
    print(f"{time.perf_counter() - t_start:.0f} s -> {spec.out}")
    return record


if __name__ == "__main__":
    main()
