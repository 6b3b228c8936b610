"""The `mtool` command line: thin wrappers that parse, call one function, and report.

Exit status (the error contract, enforced here and nowhere else):
  0    success
  1    a verification threshold failed (verify, demo)
  2    any other failure: one line `error: ...` on stderr naming the file or option at fault
  130  interrupted by SIGINT (Ctrl-C);  143  terminated by SIGTERM
Tracebacks only with --debug or MTOOL_DEBUG=1. Outputs are never left half-written.
"""

from __future__ import annotations

import os

# Before numpy is imported (gguf imports it below): numpy's OpenBLAS starts one thread per core
# at import, whose start-up and spinning cost ~0.1 s of CPU in every run (measured on the 2-core
# VM, 0.25B bf16 conversion: 1.0 -> 0.82 s wall). mtool does no BLAS work in numpy: torch's
# matmuls go to its own MKL/OpenMP threads, which this does not touch. A user's setting wins.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import json
import logging
import signal
import sys
import time
import traceback
from pathlib import Path

import click

from . import __version__
from .convert.quant_policy import KQUANTS
from .errors import EXIT_ERROR, EXIT_SIGINT, EXIT_SIGTERM, EXIT_VERIFY_FAILED, MtoolError, Terminated, UsageError

EXIT_FAIL = EXIT_VERIFY_FAILED


def _debug_enabled(ctx: click.Context | None) -> bool:
    if os.environ.get("MTOOL_DEBUG", "") not in ("", "0"):
        return True
    root = ctx.find_root() if ctx else None
    return bool(root and root.params.get("debug"))


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


class _Group(click.Group):
    """The one place where failures become exit codes and one-line messages."""

    def main(self, *args, **kwargs):
        # click prints usage errors as several lines; the contract is one line, exit 2.
        # Without standalone mode click returns ctx.exit()'s code instead of exiting.
        kwargs.pop("standalone_mode", None)
        try:
            rv = super().main(*args, standalone_mode=False, **kwargs)
        except click.ClickException as e:
            click.echo(f"error: {_one_line(e.format_message())}", err=True)
            sys.exit(EXIT_ERROR)
        except click.exceptions.Abort:
            click.echo("interrupted; no output was written", err=True)
            sys.exit(EXIT_SIGINT)
        sys.exit(rv if isinstance(rv, int) else 0)

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except (click.exceptions.Exit, click.ClickException, click.exceptions.Abort):
            raise
        except MtoolError as e:
            if _debug_enabled(ctx):
                traceback.print_exc()
            click.echo(f"error: {_one_line(e)}", err=True)
            ctx.exit(EXIT_ERROR)
        except KeyboardInterrupt:
            click.echo("interrupted; no output was written", err=True)
            ctx.exit(EXIT_SIGINT)
        except Terminated:
            click.echo("terminated; no output was written", err=True)
            ctx.exit(EXIT_SIGTERM)
        except ModuleNotFoundError as e:  # a dependency this step needs is missing or broken
            if _debug_enabled(ctx):
                traceback.print_exc()
            package = (e.name or "a package").split(".")[0]
            click.echo(f"error: this step needs the Python package '{package}', which cannot be imported "
                       f"({_one_line(e)}); install mtool's dependencies (make install)", err=True)
            ctx.exit(EXIT_ERROR)
        except Exception as e:  # noqa: BLE001 - the contract: never a bare traceback
            if _debug_enabled(ctx):
                traceback.print_exc()
            msg = _one_line(f"{type(e).__name__}: {e}")[:300]
            click.echo(f"error: internal error: {msg} (rerun with --debug for details)", err=True)
            ctx.exit(EXIT_ERROR)


class _NoteHandler(logging.Handler):
    """mtool's library notes (cleanups, fallbacks) as `note: ...` lines on stderr."""

    def emit(self, record: logging.LogRecord) -> None:
        click.echo(f"note: {record.getMessage()}", err=True)


def _on_sigterm(signum, frame) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a second SIGTERM ends the process at once
    raise Terminated()


def _setup_process() -> None:
    # environment, not imports: importing transformers here would add a second to every command
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    logging.getLogger("gguf").setLevel(logging.ERROR)
    log = logging.getLogger("mtool")
    if not any(isinstance(h, _NoteHandler) for h in log.handlers):
        log.addHandler(_NoteHandler())
    log.setLevel(logging.INFO)
    log.propagate = False
    import threading

    if threading.current_thread() is threading.main_thread():
        # SIGTERM (timeout, CI cancellation) cleans up exactly like Ctrl-C
        signal.signal(signal.SIGTERM, _on_sigterm)
    if "transformers" in sys.modules:  # imported before the variables above were set (in-process callers)
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()
    from .memory import return_freed_memory_promptly

    return_freed_memory_promptly()  # process-wide allocator tuning: only here, in the CLI entry


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="mtool")
@click.option("--debug", is_flag=True, help="Show tracebacks of errors (also: MTOOL_DEBUG=1).")
def cli(debug: bool) -> None:
    """Turn Hugging Face LLM checkpoints into verified release artifacts.

    \b
    Typical release flow:
      mtool inspect ./Yi-34B
      mtool convert ./Yi-34B -o yi-34b-q8_0.gguf --outtype q8_0
      mtool verify ./Yi-34B yi-34b-q8_0.gguf --json report.json   # exit 1 on failure
    All artifacts of a model from one recipe, verified, checksummed and documented:
      mtool release build ./Yi-34B -r sus-chat-34b -o release/

    \b
    Exit status: 0 success, 1 verification failed, 2 any other error (one line on stderr),
    130 interrupted (SIGINT), 143 terminated (SIGTERM).
    """
    _setup_process()


def _calibration_options(device_help: str):
    """--calib, --nsamples, --seqlen and --device of the commands that run the model on calibration text."""
    opts = [
        click.option("--calib", type=click.Path(path_type=Path), default=None,
                     help="Calibration text (.txt, or .jsonl with 'text'). Default: the built-in English/Chinese sample."),
        click.option("--nsamples", type=click.IntRange(min=1), default=16, show_default=True,
                     help="Calibration windows (llama.cpp: chunks)."),
        click.option("--seqlen", type=click.IntRange(min=8), default=128, show_default=True,
                     help="Tokens per calibration window."),
        click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True,
                     help=device_help),
    ]
    return lambda fn: _apply(fn, opts)


def _apply(fn, opts: list):
    for opt in reversed(opts):
        fn = opt(fn)
    return fn


class _LayerBar:
    """A progress bar over decoder layers, created at the first finished layer (so that input
    errors come without a bar); nothing with --quiet."""

    def __init__(self, total: int, desc: str, quiet: bool):
        self.total, self.desc, self.quiet, self.bar = total, desc, quiet, None

    def update(self, index: int, **postfix) -> None:
        if self.quiet:
            return
        if self.bar is None:
            from tqdm import tqdm

            self.bar = tqdm(total=self.total, desc=self.desc, unit="layer", leave=False, initial=index)
        self.bar.update(1)
        if postfix:
            self.bar.set_postfix(**postfix)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _mixture_options(fn):
    """The K-/I-quant options `convert` (to GGUF) and `quantize` share, as llama-quantize has them."""
    opts = [
        click.option("--imatrix", "imatrix", type=click.Path(path_type=Path), default=None, metavar="FILE",
                     help="Importance matrix: llama.cpp's GGUF format (from `mtool imatrix` or llama-imatrix) "
                          "or its legacy .dat. Required by iq3_xxs, iq2_* and iq1_*."),
        click.option("--tensor-type", "tensor_type", multiple=True, metavar="REGEX=TYPE",
                     help="Type of the tensors whose GGUF name matches REGEX, e.g. attn_v=q8_0 (repeatable; "
                          "first match wins)."),
        click.option("--output-tensor-type", default=None, metavar="TYPE", help="Type of output.weight."),
        click.option("--token-embedding-type", default=None, metavar="TYPE", help="Type of token_embd.weight."),
        click.option("--no-fallback", is_flag=True,
                     help="Fail instead of writing a tensor whose rows do not fit its type in a bigger type."),
    ]
    return _apply(fn, opts)


def _mixture(imatrix: Path | None, tensor_type: tuple[str, ...], output_tensor_type: str | None,
             token_embedding_type: str | None, no_fallback: bool):
    from .artifacts import mixture_options
    from .convert.imatrix_file import read_imatrix
    from .recipes.schema import GgufOptions

    o = GgufOptions(tensor_types=tensor_type, output_tensor_type=output_tensor_type,
                    token_embedding_type=token_embedding_type, no_fallback=no_fallback)
    return mixture_options(o, read_imatrix(imatrix) if imatrix else None, flags=True)


@cli.command()
@click.argument("src", type=click.Path(path_type=Path))
@click.option("-o", "--output", "out", required=True, type=click.Path(path_type=Path), help="Output file (.gguf) or directory.")
@click.option("--to", "to", type=click.Choice(["gguf", "hf", "gptq", "awq"]), default=None,
              help="Output format. Default: gguf when OUT ends in .gguf.")
@click.option("--outtype", default="f16", show_default=True, metavar="TYPE",
              type=click.Choice(["f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "q5_0", "q5_1", *KQUANTS]),
              help="GGUF tensor type: f32 f16 bf16 q8_0 q4_0 q4_1 q5_0 q5_1, or a K-/I-quant mixture "
                   "(q2_k q3_k_s q3_k_m q3_k_l q4_k_s q4_k_m q5_k_s q5_k_m q6_k iq4_nl iq4_xs iq3_s iq3_m; with "
                   "--imatrix also iq3_xxs iq2_xxs iq2_xs iq2_s iq2_m iq1_s iq1_m) whose per-tensor types and "
                   "bytes are llama-quantize's. Norms and 1-D tensors stay f32.")
@click.option("--split-max-size", default=None, metavar="SIZE",
              help="Shards of at most SIZE (e.g. 2G, 500M). GGUF: llama.cpp loads the first shard. "
                   "HF: safetensors shard size (default 5G).")
@click.option("--name", default=None, help="general.name written into the GGUF (default: source directory name).")
@click.option("--recipe", default=None, metavar="NAME|FILE",
              help="Apply a release recipe (chat template, eos token): a built-in name (see `mtool recipes`) or a YAML file.")
@click.option("--bits", type=int, default=4, show_default=True, help="GPTQ: 2, 3, 4 or 8; AWQ: 4.")
@click.option("--group-size", type=int, default=128, show_default=True, help="GPTQ: -1, 32, 64, 128; AWQ: 32, 64, 128.")
@click.option("--sym/--asym", default=True, show_default=True, help="GPTQ grid (AWQ is always asymmetric).")
@click.option("--desc-act", is_flag=True, help="GPTQ act-order: quantize columns by descending Hessian diagonal.")
@click.option("--damp", type=float, default=0.01, show_default=True, help="GPTQ damping (x mean diag H; raised on Cholesky failure).")
@_calibration_options("Where GPTQ/AWQ run (cuda when available with auto).")
@click.option("--expert-naming", type=click.Choice(["legacy", "gptqmodel"]), default="legacy", show_default=True,
              help="MoE expert tensor names: the source's legacy w1/w2/w3 (vLLM), or mlp.experts.E.*_proj (GPTQModel).")
@_mixture_options
@click.option("--force", is_flag=True, help="Overwrite OUT if it exists.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
def convert(src: Path, out: Path, to: str | None, outtype: str, split_max_size: str | None, name: str | None,
            recipe: str | None, bits: int, group_size: int, sym: bool, desc_act: bool, damp: float,
            calib: Path | None, nsamples: int, seqlen: int, device: str, expert_naming: str,
            imatrix: Path | None, tensor_type: tuple[str, ...], output_tensor_type: str | None,
            token_embedding_type: str | None, no_fallback: bool, force: bool, quiet: bool) -> None:
    """Convert the HF checkpoint SRC to OUT.

    \b
    SRC is an HF model directory of a supported family (Llama, Mistral, Mixtral/Huozi, Qwen2,
    TeleChat 7B/12B/52B). --to hf writes a plain Llama/Mixtral/Qwen2 checkpoint that loads
    without remote code (TeleChat is re-expressed exactly as Llama). --to gptq|awq quantizes
    layer by layer on calibration text into the GPTQ v1 / AWQ GEMM checkpoint formats.

    \b
    Examples:
      mtool convert ./SUS-Chat-34B -o sus-chat-34b-f16.gguf
      mtool convert ./Ziya2-13B-Chat -o ziya2-q8_0.gguf --outtype q8_0 --split-max-size 4G
      mtool convert ./Huozi-3.5 -o huozi-q4_k_m.gguf --outtype q4_k_m --imatrix huozi.imatrix.gguf
      mtool convert ./TeleChat-12B -o telechat-12b-llama --to hf
      mtool convert ./Yi-34B -o yi-34b-gptq --to gptq --bits 4 --group-size 128 --calib wiki.txt --nsamples 128 --seqlen 512
      mtool convert ./Yi-34B -o yi-34b-awq --to awq --calib wiki.txt
    """
    from .artifacts import BuildInputs, build_artifact, check_artifact
    from .device import resolve_device
    from .model.checkpoint import parse_size
    from .model.families import load_canonical
    from .recipes import load_recipe
    from .recipes.schema import ArtifactSpec, AwqOptions, GgufOptions, GptqOptions, HfOptions

    to = to or ("gguf" if out.suffix == ".gguf" else None)
    if to is None:
        raise UsageError("cannot tell the output format: give --to, or an OUT ending in .gguf")
    if to != "gguf" and out.suffix == ".gguf":
        raise UsageError(f"--to {to} writes a model directory, but OUT {out} ends in .gguf")
    _refuse_inapplicable(click.get_current_context(), to)
    parse_size(split_max_size)  # a bad size is refused before the source is opened
    options = {
        "gguf": lambda: GgufOptions(outtype, split_max_size, imatrix is not None, tensor_type, output_tensor_type,
                                    token_embedding_type, no_fallback),
        "hf": lambda: HfOptions(split_max_size),
        "gptq": lambda: GptqOptions(bits, group_size, sym, desc_act, damp, expert_naming),
        "awq": lambda: AwqOptions(bits, group_size, expert_naming),
    }[to]()
    spec = ArtifactSpec(name=out.stem if to == "gguf" else out.name, to=to, options=options)
    if to == "gguf":
        _mixture(None, tensor_type, output_tensor_type, token_embedding_type, no_fallback)  # flags' own errors
    im = None
    if imatrix is not None:
        from .convert.imatrix_file import read_imatrix

        im = read_imatrix(imatrix)
    rec = load_recipe(recipe) if recipe else None
    model = load_canonical(src)
    if rec:
        rec.check_family(model.family)
    for note in model.notes:
        click.echo(f"note: {note}", err=True)
    if to in ("gptq", "awq"):
        check_artifact(model, spec)
    dev = resolve_device(device) if to in ("gptq", "awq") else "cpu"
    bar = _LayerBar(model.n_layers, f"{to} layers", quiet)
    built = build_artifact(model, spec, out, BuildInputs(
        recipe=rec, calib=calib, nsamples=nsamples, seqlen=seqlen, device=dev, imatrix=im, gguf_name=name,
        force=force, progress=not quiet,
        on_layer=lambda r: bar.update(r.index, err=f"{max(r.errors.values()):.2e}")))
    bar.close()
    if to == "gguf":
        built.detail.notes = built.notes
        _report_gguf(built.detail)
    elif to == "hf":
        click.echo(f"wrote {model.spec.hf_class} checkpoint ({len(model.tensors)} tensors, "
                   f"{model.total_bytes() / 1e6:.1f} MB) in {built.seconds:.1f} s\n  {built.files[0]}")
    else:
        _report_quantized(built.detail, spec, nsamples, seqlen, dev)


# convert options and the --to formats they mean something for
_OPTION_FORMATS = {
    "outtype": {"gguf"}, "name": {"gguf"},
    "bits": {"gptq", "awq"}, "group_size": {"gptq", "awq"}, "sym": {"gptq"}, "desc_act": {"gptq"},
    "damp": {"gptq"}, "calib": {"gptq", "awq"}, "nsamples": {"gptq", "awq"}, "seqlen": {"gptq", "awq"},
    "device": {"gptq", "awq"}, "expert_naming": {"gptq", "awq"},
    "imatrix": {"gguf"}, "tensor_type": {"gguf"}, "output_tensor_type": {"gguf"}, "token_embedding_type": {"gguf"},
    "no_fallback": {"gguf"},
}


def _refuse_inapplicable(ctx: click.Context, to: str) -> None:
    """Options given on the command line that the chosen format would ignore are an error."""
    for name, formats in _OPTION_FORMATS.items():
        if to not in formats and ctx.get_parameter_source(name) == click.core.ParameterSource.COMMANDLINE:
            flag = "--" + name.replace("_", "-")
            raise UsageError(f"{flag} does not apply to --to {to} (it is for --to {' / '.join(sorted(formats))})")


def _report_quantized(rep, spec, nsamples: int, seqlen: int, device: str) -> None:
    o = spec.options
    click.echo(f"{spec.to} {o.bits}-bit g{o.group_size}: {len(rep.layers)} layers on {device} in {rep.seconds:.1f} s "
               f"({nsamples} x {seqlen} calibration tokens)")
    click.echo(f"{'layer':>5} {'seconds':>8}  relative output error per linear (max / mean)")
    for lr in rep.layers:
        errs = list(lr.errors.values())
        experts = f"  routed tokens per expert: {lr.expert_tokens}" if lr.expert_tokens else ""
        click.echo(f"{lr.index:>5} {lr.seconds:>8.2f}  {max(errs):.3e} / {sum(errs) / len(errs):.3e}{experts}")
    if any(lr.expert_tokens for lr in rep.layers):
        click.echo("  (statistics: every calibration token visits every expert; the router stays unquantized)")
    click.echo(f"  {rep.out}")


@cli.command()
@click.argument("src", type=click.Path(path_type=Path))
@click.option("-o", "--output", "out", required=True, type=click.Path(path_type=Path), help="Output .gguf file.")
@click.option("--outtype", required=True, type=click.Choice(list(KQUANTS)), metavar="TYPE",
              help=f"K-/I-quant mixture: {' '.join(KQUANTS)} (iq3_xxs, iq2_* and iq1_* need --imatrix).")
@click.option("--split-max-size", default=None, metavar="SIZE", help="Shards of at most SIZE (e.g. 2G).")
@_mixture_options
@click.option("--force", is_flag=True, help="Overwrite OUT if it exists.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
def quantize(src: Path, out: Path, outtype: str, split_max_size: str | None, imatrix: Path | None,
             tensor_type: tuple[str, ...], output_tensor_type: str | None, token_embedding_type: str | None,
             no_fallback: bool, force: bool, quiet: bool) -> None:
    """Re-quantize the f32/f16/bf16 GGUF SRC (single or split) to OUT, as llama-quantize does.

    Metadata and vocabulary are kept; each tensor gets llama.cpp's type for OUTTYPE and
    libggml's bytes. Quantized inputs are refused. To go from an HF checkpoint, use
    `mtool convert --outtype TYPE` instead: one pass, no intermediate file.

    \b
    Example:
      mtool quantize yi-34b-bf16.gguf -o yi-34b-q4_k_m.gguf --outtype q4_k_m
      mtool quantize yi-34b-bf16.gguf -o yi-34b-iq2_m.gguf --outtype iq2_m --imatrix yi.imatrix.gguf \\
          --tensor-type attn_v=q8_0 --output-tensor-type q8_0
    """
    from .model.checkpoint import parse_size
    from .convert.gguf_requantize import requantize_gguf

    split_bytes = parse_size(split_max_size)
    mixture = _mixture(imatrix, tensor_type, output_tensor_type, token_embedding_type, no_fallback)
    res = requantize_gguf(src, out, outtype, split_max_size=split_bytes, force=force, progress=not quiet,
                          mixture=mixture)
    _report_gguf(res)


def _report_gguf(res) -> None:
    """Types, fallbacks and effective bits per weight of a written GGUF (fallbacks inflate size)."""
    for note in res.notes + res.fallbacks[:3]:
        click.echo(f"note: {note}", err=True)
    if len(res.fallbacks) > 3:
        click.echo(f"note: ... and {len(res.fallbacks) - 3} more tensor(s) written in a fallback type", err=True)
    types = ", ".join(f"{k} x{v}" for k, v in sorted(res.type_counts.items()))
    bpw = f", {8 * res.bytes_out / res.n_params:.2f} bits per weight" if res.n_params else ""
    click.echo(f"wrote {len(res.files)} file(s), {res.n_tensors} tensors ({types}), {res.bytes_out / 1e6:.1f} MB"
               f"{bpw} in {res.seconds:.1f} s; {res.n_fallbacks} fallback(s)")
    for f in res.files:
        click.echo(f"  {f}")


@cli.command()
@click.argument("src", type=click.Path(path_type=Path))
@click.option("-o", "--output", "out", required=True, type=click.Path(path_type=Path),
              help="Output importance matrix (.gguf, llama.cpp's imatrix format).")
@_calibration_options("Where the layers run (cuda when available with auto).")
@click.option("--force", is_flag=True, help="Overwrite OUT if it exists.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
def imatrix(src: Path, out: Path, calib: Path | None, nsamples: int, seqlen: int, device: str, force: bool,
            quiet: bool) -> None:
    """Compute the importance matrix of the HF checkpoint SRC on calibration text.

    \b
    The HF model runs in torch one decoder layer at a time (memory: one layer plus the
    activations); for every weight of every block the squared inputs are summed per column, as
    llama-imatrix does (MoE experts: over the tokens the router sends them, counted per expert).
    The file is llama.cpp's GGUF imatrix format: `mtool convert/quantize --imatrix` and
    llama-quantize both read it.

    \b
    Example:
      mtool imatrix ./Huozi-3.5 -o huozi.imatrix.gguf --calib calib.txt --nsamples 128 --seqlen 512
      mtool convert ./Huozi-3.5 -o huozi-iq2_m.gguf --outtype iq2_m --imatrix huozi.imatrix.gguf
    """
    from .model.families import load_canonical
    from .device import resolve_device
    from .quantize.imatrix import make_imatrix

    model = load_canonical(src)
    for note in model.notes:
        click.echo(f"note: {note}", err=True)
    dev = resolve_device(device)
    bar = _LayerBar(model.n_layers, "imatrix layers", quiet)
    rep = make_imatrix(model, out, calib=calib, nsamples=nsamples, seqlen=seqlen, device=dev, force=force,
                       on_layer=lambda r: bar.update(r.index))
    bar.close()
    click.echo(f"imatrix: {len(rep.imatrix.sums)} entries from {nsamples} x {seqlen} = {rep.tokens} tokens on {dev} "
               f"in {rep.seconds:.1f} s ({rep.tokens / max(rep.seconds, 1e-9):.0f} tokens/s)")
    for lr in rep.layers:
        if lr.expert_tokens is not None:
            click.echo(f"  layer {lr.index:>3}: routed tokens per expert {lr.expert_tokens}")
    for name, k in rep.imatrix.starved().items():
        click.echo(f"note: {k} expert(s) of {name} saw no calibration token (importances 1.0 there); "
                   f"use more or more varied calibration text", err=True)
    click.echo(f"  {rep.out}")


@cli.command()
@click.argument("ref", type=click.Path(path_type=Path))
@click.argument("cand", type=click.Path(path_type=Path))
@click.option("--data", type=click.Path(path_type=Path), default=None,
              help="Evaluation text (.txt, or .jsonl with a 'text' field). Default: built-in English/Chinese sample.")
@click.option("--json", "json_out", type=click.Path(path_type=Path), default=None, help="Write the report as JSON here.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True,
              help="Device of the torch runners. llama.cpp offloads to the GPU when built with GPU support.")
@click.option("--ctx", default=512, show_default=True, type=click.IntRange(min=16),
              help="Tokens per evaluation window (capped at the model's context; at least 16).")
@click.option("--max-windows", default=8, show_default=True, type=click.IntRange(min=1),
              help="Evaluate at most this many windows (at least 64 positions must be scored).")
@click.option("--max-kld", type=click.FloatRange(min=0), default=None, help="Fail when mean KL divergence exceeds this (default per type).")
@click.option("--min-top1", type=click.FloatRange(0, 1), default=None, help="Fail when top-1 agreement is below this fraction.")
@click.option("--max-ppl-ratio", type=click.FloatRange(min=0), default=None, help="Fail when PPL(candidate)/PPL(reference) exceeds this.")
@click.option("--allow-token-mismatch", is_flag=True, help="Do not fail when the candidate tokenizes differently.")
@click.option("--threads", type=click.IntRange(min=1), default=None, help="CPU threads for llama.cpp (default: all cores).")
@click.option("--reference", type=click.Choice(["auto", "whole", "streamed"]), default="auto", show_default=True,
              help="How REF runs: whole (the model in float32 at once), streamed (one decoder layer at a time over "
                   "all windows: memory of one layer, for models larger than RAM or GPU), auto (streamed above 1 GiB "
                   "of float32 weights).")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
def verify(ref: Path, cand: Path, data: Path | None, json_out: Path | None, device: str, ctx: int, max_windows: int,
           max_kld: float | None, min_top1: float | None, max_ppl_ratio: float | None,
           allow_token_mismatch: bool, threads: int | None, reference: str, quiet: bool) -> None:
    """Check that artifact CAND computes what the HF model REF computes.

    Runs both on the same token windows and reports perplexities, PPL ratio, mean and p99
    KL divergence, top-1 agreement, max |delta logit| and tokenization agreement.
    Exits 1 when a threshold is exceeded, so it can gate CI.

    \b
    Example:
      mtool verify ./Yi-34B yi-34b-q8_0.gguf --json verify.json
    """
    from .outputs import check_report_path, write_report
    from .verify.report import run_verify

    if json_out:
        check_report_path(json_out, "--json")  # before minutes of work, not after
    rep = run_verify(ref, cand, data=data, device=device, ctx=ctx, max_windows=max_windows,
                     overrides={"max_kld": max_kld, "min_top1": min_top1, "max_ppl_ratio": max_ppl_ratio},
                     allow_token_mismatch=allow_token_mismatch, threads=threads, progress=not quiet,
                     reference=reference)
    if json_out:
        write_report(json_out, json.dumps(rep.as_dict(), indent=2, ensure_ascii=False, allow_nan=False))
    click.echo(rep.table())
    if not rep.passed:
        sys.exit(EXIT_FAIL)


@cli.command()
@click.argument("path", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def inspect(path: Path, as_json: bool) -> None:
    """Summarize an HF model directory or a GGUF file.

    \b
    Example:
      mtool inspect model-q8_0.gguf
    """
    from .inspect import inspect_path, render

    summary = inspect_path(path)
    click.echo(json.dumps(summary, indent=2, default=str) if as_json else render(summary))


@cli.command()
@click.argument("sources", nargs=-1, type=click.Path(path_type=Path))
@click.option("-o", "--output", "out", required=True, type=click.Path(path_type=Path), help="Output model directory.")
@click.option("--config", "config_file", type=click.Path(path_type=Path), default=None,
              help="YAML merge config (models, weights, method, base, parameters, per-tensor filters).")
@click.option("--method", type=click.Choice(["linear", "slerp", "task_arithmetic", "ties", "dare_linear", "dare_ties"]),
              default=None, help="Merge method (default linear).")
@click.option("--weights", default=None, help="Comma-separated weights, one per source (default: equal).")
@click.option("--base", type=click.Path(path_type=Path), default=None, help="Base model for task_arithmetic/ties/dare.")
@click.option("--no-normalize", is_flag=True, default=None, help="Do not divide by the sum of the weights.")
@click.option("--t", "t", type=float, default=None, help="slerp interpolation factor in [0, 1] (default 0.5).")
@click.option("--density", type=float, default=None, help="ties/dare: fraction of each task vector kept (default 0.5).")
@click.option("--lambda", "lam", type=float, default=None, help="Scale of the merged task vector (default 1.0).")
@click.option("--seed", type=int, default=None, help="Seed of dare's random drop (default 0).")
@click.option("--dtype", type=click.Choice(["float32", "float16", "bfloat16"]), default=None,
              help="Output dtype (default: the sources' dtype). Merging always accumulates in float32.")
@click.option("--tokenizer-source", type=click.Path(path_type=Path), default=None,
              help="Take the tokenizer from this directory (required when the sources' tokenizers differ).")
@click.option("--layout", type=click.Choice(["canonical", "original"]), default=None,
              help="canonical: the architecture's HF names (any family; TeleChat becomes Llama). "
                   "original: the sources' own tensor names and config (all sources must share them).")
@click.option("--split-max-size", default=None, metavar="SIZE", help="safetensors shard size (default 5G).")
@click.option("--force", is_flag=True, help="Overwrite OUT if it exists.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
def merge(sources: tuple[Path, ...], out: Path, config_file: Path | None, method: str | None, weights: str | None,
          base: Path | None, no_normalize: bool | None, t: float | None, density: float | None, lam: float | None,
          seed: int | None, dtype: str | None, tokenizer_source: Path | None, layout: str | None,
          split_max_size: str | None, force: bool, quiet: bool) -> None:
    """Merge checkpoints SOURCES... into OUT, tensor by tensor (memory: a few tensors).

    Checks before any work that the sources share architecture, tensor names, shapes and
    tokenizer (or --tokenizer-source), and that weights match the sources. The merge recipe is
    recorded in OUT/README.md, OUT/mtool_merge.json and the safetensors metadata.

    \b
    Examples:
      mtool merge ./ckpt-a ./ckpt-b ./ckpt-c -o ./merged --weights 0.5,0.3,0.2
      mtool merge ./a ./b -o ./mid --method slerp --t 0.3
      mtool merge ./sft ./math -o ./ties --method ties --base ./base --density 0.4
      mtool merge -o ./release --config merge.yaml
    """
    from .model.checkpoint import parse_size
    from .merge import MergeSpec, run_merge, spec_from_yaml

    if config_file is not None:
        if sources:
            raise MtoolError("give the sources either on the command line or in --config, not both")
        spec = spec_from_yaml(config_file)
    else:
        spec = MergeSpec(sources=list(sources))
    if weights is not None:
        try:
            spec.weights = [float(x) for x in weights.split(",")]
        except ValueError:
            raise MtoolError(f"--weights must be comma-separated numbers, got {weights!r}") from None
    for attr, value in (("method", method), ("base", base), ("t", t), ("density", density), ("lam", lam),
                        ("seed", seed), ("dtype", dtype), ("tokenizer_source", tokenizer_source), ("layout", layout)):
        if value is not None:
            setattr(spec, attr, value)
    if no_normalize:
        spec.normalize = False
    t0 = time.perf_counter()
    path = run_merge(spec, out, force=force, max_shard_bytes=parse_size(split_max_size) or 5 * 1000**3,
                     progress=not quiet)
    click.echo(f"merged {len(spec.sources)} models ({spec.method}) in {time.perf_counter() - t0:.1f} s\n  {path}")


@cli.command("extend-vocab")
@click.argument("src", type=click.Path(path_type=Path))
@click.option("-o", "--output", "out", required=True, type=click.Path(path_type=Path), help="Output model directory.")
@click.option("--tokens", "tokens_file", type=click.Path(path_type=Path), default=None,
              help="Text file with one new token per line (duplicates and existing tokens are reported and skipped).")
@click.option("--sp-model", type=click.Path(path_type=Path), default=None,
              help="Merge the normal pieces of this SentencePiece model (the Chinese-LLaMA way).")
@click.option("--special", multiple=True, help="Add a special (control) token, e.g. a chat marker. Repeatable.")
@click.option("--init", type=click.Choice(["subword-mean", "mean", "normal"]), default="subword-mean", show_default=True,
              help="New rows: mean of the old rows of the pieces the old tokenizer splits the token into; "
                   "the mean of all old rows; or normal noise around it.")
@click.option("--pad-to-multiple-of", type=int, default=0, help="Round the vocabulary up with unused rows.")
@click.option("--seed", type=int, default=0, help="Seed for --init normal.")
@click.option("--force", is_flag=True, help="Overwrite OUT if it exists.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
def extend_vocab_cmd(src: Path, out: Path, tokens_file: Path | None, sp_model: Path | None, special: tuple[str, ...],
                     init: str, pad_to_multiple_of: int, seed: int, force: bool, quiet: bool) -> None:
    """Add tokens to SRC's tokenizer and grow its embeddings (and untied lm_head) into OUT.

    SentencePiece tokenizers get the new tokens as normal pieces (plus the intermediate
    pieces BPE needs to reach them); byte-level BPE tokenizer.json files get vocabulary
    entries and merges. The model keeps every old row, so text without new tokens computes
    exactly as before, and stays convertible to GGUF with all new tokens.

    \b
    Examples:
      mtool extend-vocab ./Mixtral-8x7B -o ./mixtral-zh --tokens zh_words.txt --pad-to-multiple-of 64
      mtool extend-vocab ./Mixtral-8x7B -o ./mixtral-zh --sp-model chinese_sp.model
      mtool extend-vocab ./mixtral-zh -o ./mixtral-zh-chat --special '<|beginofutterance|>' --special '<|endofutterance|>'
    """
    from .vocab.extend import extend_vocab

    report = extend_vocab(src, out, tokens_file=tokens_file, sp_model=sp_model, specials=special, init=init,
                          pad_to_multiple_of=pad_to_multiple_of, seed=seed, force=force, progress=not quiet)
    click.echo(report.summary())
    click.echo(f"  {report.out}")


@cli.command()
def recipes() -> None:
    """List the built-in release recipes (use one with `mtool release build -r NAME` or `convert --recipe NAME`)."""
    from .recipes import builtin_names, load_recipe

    for n in builtin_names():
        r = load_recipe(n)
        click.echo(f"{r.name:<16} {r.family:<9} {r.description}\n{'':<27}eos: {r.eos_token or '(tokenizer default)'}; "
                   f"artifacts: {', '.join(a.name for a in r.artifacts)}")


@cli.group()
def release() -> None:
    """Build, verify, checksum and document every artifact of a recipe.

    \b
    On one machine:
      mtool release build ./Huozi-3.5 -r huozi-3.5 -o release/
    Fanned out over CI jobs (any scheduler: each job is one command):
      mtool release plan ./Huozi-3.5 -r huozi-3.5 --format json      # one job per artifact
      mtool release build ./Huozi-3.5 -r huozi-3.5 -o parts/q4_k_m --only q4_k_m
      mtool release collect parts/* -o release/
    """


@release.command("build")
@click.argument("src", type=click.Path(path_type=Path))
@click.option("-r", "--recipe", "recipe", required=True, metavar="NAME|FILE",
              help="A built-in recipe (see `mtool recipes`) or a YAML recipe file.")
@click.option("-o", "--output", "out", required=True, type=click.Path(path_type=Path),
              help="Release folder: artifacts, manifest.json, SHA256SUMS, README.md (created if missing).")
@click.option("--only", multiple=True, metavar="NAME",
              help="Build only this artifact (repeatable; 'imatrix' for the importance matrix): a part for "
                   "`release collect`.")
@click.option("--imatrix", "imatrix", type=click.Path(path_type=Path), default=None, metavar="FILE",
              help="Use this importance matrix (e.g. the imatrix job's) instead of computing one.")
@click.option("--force", is_flag=True, help="Rebuild every artifact, even those that are up to date.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True,
              help="Where GPTQ/AWQ, the importance matrix and the reference model run.")
@click.option("--threads", type=click.IntRange(min=1), default=None, help="CPU threads for llama.cpp when verifying.")
@click.option("--json", "json_out", type=click.Path(path_type=Path), default=None,
              help="Also write this run's report (the manifest and what was done) here.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bars (step lines stay).")
def release_build_cmd(src: Path, recipe: str, out: Path, only: tuple[str, ...], imatrix: Path | None, force: bool,
                      device: str, threads: int | None, json_out: Path | None, quiet: bool) -> None:
    """Build every artifact of RECIPE from the HF checkpoint SRC into OUT and verify each against SRC.

    The source is read once for its checks and hashes; an importance matrix is computed once
    when an artifact needs one; the reference model runs once (its logits are cached) and every
    artifact is compared with it on the same windows. A second run rebuilds only what changed or
    is missing or corrupted. Exit 0 when all pass, 1 when any verification fails (that artifact
    is moved to OUT/failed/ and marked failed in the manifest), 2 on errors.

    \b
    Example:
      mtool release build ./my-model -r recipe.yaml -o release/
      sha256sum -c release/SHA256SUMS
    """
    from .outputs import check_report_path, write_report
    from .recipes import load_recipe
    from .release.build import ReleaseOptions, release_build

    if json_out:
        check_report_path(json_out, "--json")
    rec = load_recipe(recipe)
    res = release_build(src, rec, out, ReleaseOptions(only=only, force=force, device=device, imatrix=imatrix,
                                                       threads=threads, progress=not quiet), echo=click.echo)
    if json_out:
        write_report(json_out, json.dumps(res.manifest, indent=2, ensure_ascii=False))
    click.echo(res.table())
    built = [n for n, a in res.actions.items() if a == "built"]
    click.echo(f"{len(built)} artifact(s) built, {len(res.actions) - len(built)} up to date; reference model runs: "
               f"{res.reference_runs}; {res.seconds:.1f} s" + ("" if built else " (nothing to do)"))
    click.echo(f"  {out}/manifest.json" + ("" if only else f", {out}/SHA256SUMS, {out}/README.md"))
    if not res.passed:
        click.echo(f"FAIL: verification failed for {', '.join(res.failed)}", err=True)
        sys.exit(EXIT_FAIL)


@release.command("plan")
@click.argument("src")
@click.option("-r", "--recipe", "recipe", required=True, metavar="NAME|FILE", help="Built-in recipe or YAML file.")
@click.option("--format", "fmt", type=click.Choice(["json", "github-matrix", "shell"]), default="json",
              show_default=True, help="json: jobs with their dependencies; github-matrix: the artifact jobs as a "
                                      "strategy matrix; shell: the commands in dependency order.")
@click.option("--parts", default="parts", show_default=True, help="Folder under which each job writes its part.")
def release_plan_cmd(src: str, recipe: str, fmt: str, parts: str) -> None:
    """Print one job per artifact of RECIPE (the importance matrix job first), for any scheduler.

    \b
    Each job is `mtool release build SRC -r RECIPE -o PARTS/NAME --only NAME`; afterwards
    `mtool release collect PARTS/* -o DIR` assembles the release.
    """
    from .recipes import load_recipe
    from .release.fanout import github_matrix, plan

    jobs = plan(src, recipe, load_recipe(recipe), parts)
    if fmt == "json":
        click.echo(json.dumps({"jobs": jobs, "collect": f"mtool release collect {parts}/* -o release"}, indent=2))
    elif fmt == "github-matrix":
        click.echo(json.dumps(github_matrix(jobs), separators=(",", ":")))
    else:
        click.echo("\n".join(j["command"] for j in jobs))


@release.command("collect")
@click.argument("parts", nargs=-1, type=click.Path(path_type=Path))
@click.option("-o", "--output", "out", required=True, type=click.Path(path_type=Path), help="Release folder.")
@click.option("--force", is_flag=True, help="Collect into a folder that is not empty.")
def release_collect_cmd(parts: tuple[Path, ...], out: Path, force: bool) -> None:
    """Check that the PARTS (folders of `release build --only`) agree and assemble the release in OUT.

    Parts must come from the same source files, recipe and mtool version; every file is checked
    against its sha256. Writes OUT/manifest.json, OUT/SHA256SUMS and OUT/README.md. Exit 1 when
    an artifact failed its verification in its part.
    """
    from .release.fanout import collect

    manifest, _ = collect(list(parts), out, force=force)
    failed = [a["name"] for a in manifest["artifacts"] if a["status"] == "failed"]
    click.echo(f"collected {len(manifest['artifacts'])} artifact(s) from {len(parts)} part(s) into {out}")
    if failed:
        click.echo(f"FAIL: verification failed for {', '.join(failed)}", err=True)
        sys.exit(EXIT_FAIL)


@cli.command()
@click.option("--workdir", type=click.Path(path_type=Path), default=None, help="Where to put the demo files (default: a temp dir).")
def demo(workdir: Path | None) -> None:
    """Build a tiny Llama, convert it to GGUF (f16, q8_0) and verify each with llama.cpp."""
    from .demo import run_demo

    reports = run_demo(workdir, echo=click.echo)
    if not all(r.passed for r in reports):
        sys.exit(EXIT_FAIL)


def main() -> None:
    cli.main(prog_name="mtool")


if __name__ == "__main__":
    main()
