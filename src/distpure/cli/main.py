"""``distpure`` entry point: one sub-command per job, each a thin layer over the library."""
from __future__ import annotations

import argparse
import sys
from typing import Callable

from ..config import from_dict, load_yaml, merge, parse_overrides

COMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None], Callable]] = {}


def command(name: str, help_text: str, arguments: Callable[[argparse.ArgumentParser], None]):
    """Register a sub-command: its help, its arguments and the function that runs it."""
    def decorate(run: Callable[[argparse.Namespace], int | None]):
        COMMANDS[name] = (help_text, arguments, run)
        return run
    return decorate


def _overrides_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--set", nargs="*", action="extend", default=[], metavar="KEY=VALUE",
                        help="override settings, e.g. --set steps=2000 data.limit=64")


def _config_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="YAML file with the settings")
    _overrides_argument(parser)


def _load_config(cls, args: argparse.Namespace):
    values = load_yaml(args.config) if args.config else {}
    return from_dict(cls, merge(values, parse_overrides(args.set)))


@command("train-diffusion", "train the small CIFAR-10 DDPM (resumable)", _config_arguments)
def _train_diffusion(args: argparse.Namespace) -> int:
    from ..training.diffusion import DiffusionTrainingConfig, train_diffusion

    print(f"exported EMA model to {train_diffusion(_load_config(DiffusionTrainingConfig, args))}")
    return 0


def _train_classifier_arguments(parser: argparse.ArgumentParser) -> None:
    _config_arguments(parser)
    parser.add_argument("--adversarial", choices=["none", "pgd"], help="adversarial training or not")


@command("train-classifier", "train a CIFAR-10 classifier, PGD adversarially by default (resumable)",
         _train_classifier_arguments)
def _train_classifier(args: argparse.Namespace) -> int:
    from ..training.classifier import ClassifierTrainingConfig, train_classifier

    if args.adversarial:
        args.set = [*args.set, f"adversarial={args.adversarial}"]
    print(f"exported weights to {train_classifier(_load_config(ClassifierTrainingConfig, args))}")
    return 0


def _demo_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--limit", type=int, default=256, help="number of CIFAR-10 test images")
    parser.add_argument("--out", default="runs/demo", help="run directory (resumable)")


@command("demo", "clean and transfer-PGD accuracy: no defence, DiffPure, victim-guided",
         _demo_arguments)
def _demo(args: argparse.Namespace) -> int:
    from ..evaluation.demo import DEMO_HEADING, demo_experiment

    return _run_and_print(demo_experiment(args.limit), args.out, heading=DEMO_HEADING)


def _evaluate_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="experiment YAML (see configs/)")
    parser.add_argument("--limit", type=int,
                        help="evaluate N images, the first N of the dataset in the order drawn with "
                             "data.seed (a prefix of any larger run; sets data.limit)")
    parser.add_argument("--out", help="run directory (default: runs/<experiment name>)")
    parser.add_argument("--new-resumption", action="store_true",
                        help="resume records made by another distpure version or resolved precision, "
                             "this session's records kept apart in the report; and drop cascade skips "
                             "that no longer hold (after distpure rescore), rerunning their attacks")
    _overrides_argument(parser)


@command("evaluate", "run an experiment config; resumable; torchrun-shardable", _evaluate_arguments)
def _evaluate(args: argparse.Namespace) -> int:
    from ..evaluation.config import load_experiment

    overrides = parse_overrides(args.set)
    if args.limit is not None:
        overrides = merge(overrides, {"data": {"limit": args.limit}})
    config = load_experiment(args.config, overrides)
    return _run_and_print(config, args.out or f"runs/{config.name}", args.new_resumption)


def _rescore_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", help="run directory written by distpure evaluate")
    parser.add_argument("--selection-draws", type=int, metavar="N",
                        help="selection draws per example (default: the run's evaluation.selection_draws)")
    parser.add_argument("--dry-run", action="store_true",
                        help="run no model and write nothing: count the records and purifications and "
                             "estimate the time from the run's own timings")
    parser.add_argument("--any-precision", action="store_true",
                        help="rescore where this machine resolves another precision than the records "
                             "(those records and sessions.jsonl say so)")


@command("rescore", "give a run's records the attacker's selection draws from its kept examples "
         "(runs from before selection draws); resumable", _rescore_arguments)
def _rescore(args: argparse.Namespace) -> int:
    from ..evaluation.rescore import rescore

    print(rescore(args.run_dir, args.selection_draws, args.dry_run, args.any_precision))
    return 0


def _certify_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="certification YAML (see configs/cifar10-certify.yaml)")
    parser.add_argument("--out", help="run directory (default: runs/<name>)")
    parser.add_argument("--summary", action="store_true",
                        help="only print the summary of the records the run directory holds (a stopped run too) "
                             "and write its report.md")
    parser.add_argument("--attack", action="store_true",
                        help="run the config's attack section instead (SmoothAdv on the images the run has "
                             "certified, scored by PREDICT; counts certificate violations; resumable)")
    _empirical_argument(parser)
    _overrides_argument(parser)


def _empirical_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--empirical", metavar="RUN_DIR",
                        help="certification reports: the evaluation run whose L2 figures are set beside the "
                             "certified ones (default: the committed results/cifar10-honest)")


def _write_certified_report(out: str, config, empirical: str | None) -> None:
    """Write a certification run's report.md (and plot) and say where."""
    from ..reporting.certified import write_certified_report
    from ..reporting.empirical import HONEST_RUN

    print(f"report: {write_certified_report(out, config, empirical or HONEST_RUN)}")


@command("certify", "certified L2 accuracy by (diffusion) denoised smoothing; resumable; torchrun-shardable",
         _certify_arguments)
def _certify(args: argparse.Namespace) -> int:
    from ..certification.attack_run import format_attack_summary, run_attack, summarize_attack_run
    from ..certification.config import load_certify_config
    from ..certification.runner import run_certification, summarize_run
    from ..certification.summary import format_summary
    from ..devices import describe_hardware
    from ..evaluation.rundir import RunDirectory

    config = load_certify_config(args.config, parse_overrides(args.set))
    out = args.out or f"runs/{config.name}"
    if args.summary:
        print(format_summary(summarize_run(config, RunDirectory(out)), config.report_radii))
        if config.attack is not None:
            print(format_attack_summary(summarize_attack_run(config, RunDirectory(out))))
        if RunDirectory(out).config.is_file():
            _write_certified_report(out, config, args.empirical)
        return 0
    if args.attack:
        summary = run_attack(config, out)
        if summary:
            print(format_attack_summary(summary))
        return 0
    summary = run_certification(config, out)
    if summary:
        print("certified accuracy (%) at L2 radius r (pixel units in [0, 1])")
        print(format_summary(summary["settings"], config.report_radii))
        print(describe_hardware(summary["hardware"]))
        print(f"\nrun directory: {out}")
        _write_certified_report(out, config, args.empirical)
    return 0


def _run_and_print(config, out: str, new_resumption: bool = False, heading: str = "") -> int:
    """Run (or resume) ``config`` in ``out`` and print its table, under ``heading`` if given."""
    from ..devices import describe_hardware
    from ..evaluation.runner import run_experiment
    from ..evaluation.summary import format_table

    summary = run_experiment(config, out, new_resumption=new_resumption)
    if summary:
        if heading:
            print(heading)
        print(format_table(summary))
        print(describe_hardware(summary["hardware"]))
        print(f"\nrun directory: {out}  (distpure report {out} writes report.md)")
    return 0


def _purify_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("input_dir", help="folder of image files")
    parser.add_argument("output_dir", help="where purified PNGs go (same names)")
    parser.add_argument("--dataset", default="cifar10", help="which recommended defence to use")
    parser.add_argument("--guidance", default="victim", help="victim, none, mse or victim+mse")
    parser.add_argument("--resize", action="store_true",
                        help="resize and center-crop images to the model's size instead of refusing them")
    parser.add_argument("--device", default="auto")
    _overrides_argument(parser)


@command("purify", "purify a folder of images into PNGs", _purify_arguments)
def _purify(args: argparse.Namespace) -> int:
    from ..defenses.recommended import load_defense
    from ..io import list_image_files, purify_folder

    list_image_files(args.input_dir)  # a missing or empty folder fails before the models load
    defense = load_defense(args.dataset, args.guidance, device=args.device, **parse_overrides(args.set))
    report = purify_folder(defense.purifier, args.input_dir, args.output_dir, resize=args.resize)
    print(f"purified {report.written} image(s) into {args.output_dir}")
    for path, reason in report.failed:
        print(f"skipped {path}: {reason}", file=sys.stderr)
    return 1 if report.failed or not report.written else 0


def _convert_adm_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", help="guided-diffusion checkpoint (.pt or .safetensors)")
    parser.add_argument("out_dir", help="directory to write the diffusers model to")
    parser.add_argument("--config", metavar="FLAGS_JSON",
                        help='guided-diffusion flags, {"flags": {...}} or the flags object '
                             "(default: <stem>_config.json or config.json beside the checkpoint, "
                             "else the 256x256 unconditional model's flags)")


@command("convert-adm", "convert a guided-diffusion (ADM) checkpoint to a diffusers directory",
         _convert_adm_arguments)
def _convert_adm(args: argparse.Namespace) -> int:
    from ..models.adm import convert_adm, read_flags

    flags = read_flags(args.config) if args.config else None
    print(f"wrote {convert_adm(args.checkpoint, args.out_dir, flags)}")
    return 0


def _convert_score_sde_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", help="score_sde checkpoint (e.g. DiffPure's checkpoint_8.pth)")
    parser.add_argument("out_dir", help="directory to write config.json and model.safetensors to")
    parser.add_argument("--config", metavar="SETTINGS_JSON",
                        help="score_sde model settings (default: an NCSN++ config beside the "
                             "checkpoint, else DDPM++ deep VP continuous, DiffPure's CIFAR-10 model)")


@command("convert-score-sde", "convert a score-SDE NCSN++ checkpoint's EMA weights to a directory",
         _convert_score_sde_arguments)
def _convert_score_sde(args: argparse.Namespace) -> int:
    from ..models.ncsnpp import convert_score_sde

    print(f"wrote {convert_score_sde(args.checkpoint, args.out_dir, args.config)}")
    return 0


def _eval_diffusion_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", nargs="?", default="cifar10-ddpm-small", help="name or path")
    parser.add_argument("--data", help="CIFAR-10 root (default: the shared JPEG copy)")
    parser.add_argument("--limit", type=int, default=1000, help="number of test images")
    parser.add_argument("--timesteps", type=int, nargs="+", default=[50, 100, 150, 200])


@command("eval-diffusion", "PSNR of a diffusion model's clean-image estimate at given t",
         _eval_diffusion_arguments)
def _eval_diffusion(args: argparse.Namespace) -> int:
    from ..data import default_data_root, load_cifar10
    from ..evaluation.denoising import denoising_psnr
    from ..models.diffusion_loader import load_diffusion

    data = load_cifar10(args.data or default_data_root() / "cifar10-jpeg", "test", n=args.limit)
    psnr = denoising_psnr(load_diffusion(args.model), data.images, args.timesteps)
    print(f"PSNR of x0 estimate on {len(data)} test images: " +
          ", ".join(f"t={t}: {value:.2f} dB" for t, value in psnr.items()))
    return 0


def _report_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", help="run directory written by distpure evaluate / demo / certify")
    parser.add_argument("--json", action="store_true",
                        help="print the recomputed summary as JSON instead of writing the report")
    _empirical_argument(parser)


@command("report", "write report.md, results.csv and plots for a run directory (a certification run: "
         "report.md and certified_accuracy.png)", _report_arguments)
def _report(args: argparse.Namespace) -> int:
    import json

    from ..certification.runner import is_certification_dir
    from ..reporting.certified import certified_summary
    from ..reporting.report import summary_json, write_report

    certification = is_certification_dir(args.run_dir)
    if args.json:
        print(json.dumps((certified_summary if certification else summary_json)(args.run_dir), indent=2))
    elif certification:
        _write_certified_report(args.run_dir, None, args.empirical)
    else:
        print(write_report(args.run_dir))
    return 0


def _bench_adm_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    parser.add_argument("--repeats", type=int, default=1,
                        help="forwards timed per precision (the fastest is kept); each takes tens of seconds")


@command("bench-adm", "FLOPs, CPU time (fp32, bf16) and memory of one full 256x256 ADM forward",
         _bench_adm_arguments)
def _bench_adm(args: argparse.Namespace) -> int:
    import json
    from dataclasses import asdict

    from ..benchmarks.adm_cost import format_cost, measure_adm_cost

    cost = measure_adm_cost(repeats=args.repeats)
    print(json.dumps(asdict(cost), indent=2) if args.json else format_cost(cost))
    return 0


def _bench_attack_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print one JSON object with every figure")
    _overrides_argument(parser)


@command("bench-attack", "one PGD-EOT step per gradient kind, EOT batched vs one draw at a time, "
         "against a purification forward", _bench_attack_arguments)
def _bench_attack(args: argparse.Namespace) -> int:
    import json

    from ..benchmarks.attack_cost import AttackBenchConfig, format_attack_benchmark, run_attack_benchmark

    result = run_attack_benchmark(from_dict(AttackBenchConfig, parse_overrides(args.set)))
    print(json.dumps(result, indent=2) if args.json else format_attack_benchmark(result))
    return 0


def _bench_certify_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, help="the JSON file to write every figure to")
    _overrides_argument(parser)


@command("bench-certify", "draws per second of smoothing's class counting (one-shot, multistep) against the "
         "bare denoiser + victim forward on the same batch", _bench_certify_arguments)
def _bench_certify(args: argparse.Namespace) -> int:
    from ..benchmarks.certify_cost import (CertifyBenchConfig, format_certify_benchmark, run_certify_benchmark,
                                           write_benchmark)

    result = run_certify_benchmark(from_dict(CertifyBenchConfig, parse_overrides(args.set)))
    print(format_certify_benchmark(result))
    print(f"wrote {write_benchmark(result, args.out)}")
    return 0


def _bench_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print one JSON object with every figure")
    _overrides_argument(parser)


@command("bench", "fast purification vs the DiffPure recipe; attack cost; FLOP/s", _bench_arguments)
def _bench(args: argparse.Namespace) -> int:
    import json

    from ..benchmarks.purification import BenchConfig, format_benchmark, run_benchmark

    result = run_benchmark(from_dict(BenchConfig, parse_overrides(args.set)))
    print(json.dumps(result, indent=2) if args.json else format_benchmark(result))
    return 0


def _bench_flops_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print one JSON object with every figure")
    parser.add_argument("--utilisation", type=float, default=None,
                        help="assumed fraction of the GPUs' bf16 peak (default 0.4)")


@command("bench-flops", "FLOPs of the full NCSN++ and a WRN-28-10, and the GPU-hours of DiffPure's "
         "honest evaluation and of certification (docs/gpu-cost.md)", _bench_flops_arguments)
def _bench_flops(args: argparse.Namespace) -> int:
    import json

    from ..benchmarks.real_cost import format_real_cost, real_setting_cost

    result = real_setting_cost(args.utilisation)
    print(json.dumps(result, indent=2) if args.json else format_real_cost(result))
    return 0


@command("bench-score-sde", "one VP-SDE purification and one exact checkpointed gradient of the "
         "full score-SDE NCSN++ (random weights) into a WRN-28-10", _bench_arguments)
def _bench_score_sde(args: argparse.Namespace) -> int:
    import json

    from ..benchmarks.score_sde_cost import (ScoreSDEBenchConfig, format_score_sde_benchmark,
                                             run_score_sde_benchmark)

    result = run_score_sde_benchmark(from_dict(ScoreSDEBenchConfig, parse_overrides(args.set)))
    print(json.dumps(result, indent=2) if args.json else format_score_sde_benchmark(result))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="distpure", description="Diffusion purification guided by the protected classifier.")
    subparsers = parser.add_subparsers(dest="command", required=True)
    for name, (help_text, arguments, _) in COMMANDS.items():
        arguments(subparsers.add_parser(name, help=help_text, description=help_text))
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _, _, run = COMMANDS[args.command]
    try:
        return int(run(args) or 0)
    except (ValueError, KeyError, FileNotFoundError, ImportError) as error:
        print(f"distpure {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
