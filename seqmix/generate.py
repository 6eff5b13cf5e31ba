"""Generate text with a trained seqmix model, streamed to the terminal as the tokens are drawn::

    python -m seqmix.generate runs/tiny --prompt "def main(" --max-new-tokens 200 --temperature 0.8 --top-k 40

``RUN_DIR`` is a training run directory (the model is its ``model/``) or a model directory
(``config.json`` + ``model.safetensors``). The prompt starts with ``BOS``, as every training document does
(``--no-bos`` leaves it out). Tokens are bytes (:mod:`seqmix.data`): the text is decoded incrementally, so
a character of several UTF-8 bytes is printed once all of its bytes are drawn.
"""

from __future__ import annotations

import argparse
import codecs
import sys
from pathlib import Path

import torch

from seqmix.archs.lm import CONFIG_FILE, WEIGHTS_FILE, LanguageModel
from seqmix.data import BOS, encode


def resolve_model_dir(path: str | Path) -> Path:
    """``path`` when it holds ``config.json``, else its ``model/`` (a training run); FileNotFoundError otherwise."""
    path = Path(path)
    for candidate in (path, path / "model"):
        if (candidate / CONFIG_FILE).is_file():
            return candidate
    raise FileNotFoundError(f"{path} is neither a model directory ({CONFIG_FILE} + {WEIGHTS_FILE}) nor a "
                            f"training run directory with model/ inside")


class TextStream:
    """Writes byte tokens to ``out`` as text as they arrive: UTF-8 decoded incrementally (a character is
    written once its last byte comes), special and padding tokens left out as :func:`seqmix.data.decode` does."""

    def __init__(self, out):
        self.out = out
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def __call__(self, tokens: torch.Tensor) -> None:
        """``tokens`` [1, n]: the new tokens of one sequence."""
        data = bytes(t for t in tokens.flatten().tolist() if 0 <= t < 256)
        self.write(self.decoder.decode(data))

    def write(self, text: str) -> None:
        self.out.write(text)
        self.out.flush()

    def close(self) -> None:
        self.write(self.decoder.decode(b"", final=True))


def _number(kind, low: float, finite: bool = False):
    """An argparse type: ``kind`` (int or float) >= ``low``; argparse reports the message with the flag."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a{'n integer' if kind is int else ' number'}") from None
        if not value >= low or (finite and value == float("inf")):  # `not >=` also refuses nan
            raise argparse.ArgumentTypeError(f"must be {'a finite number ' if finite else ''}>= {low}, got {text}")
        return value
    return parse


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="seqmix.generate", description="Sample text from a trained seqmix model, streamed as it is drawn.")
    parser.add_argument("run_dir", metavar="RUN_DIR",
                        help="a training run directory (with model/ inside) or a model directory")
    parser.add_argument("--prompt", default="", help="the text to continue (default: none, only BOS)")
    parser.add_argument("--no-bos", action="store_true",
                        help="do not start the prompt with BOS (training documents start with it)")
    parser.add_argument("--max-new-tokens", type=_number(int, 0), default=200, help="tokens (bytes) to draw (default: %(default)s)")
    parser.add_argument("--temperature", type=_number(float, 0, finite=True), default=0.8, help="0 is greedy (default: %(default)s)")
    parser.add_argument("--top-k", type=_number(int, 1), default=None,
                        help="draw from the k most likely tokens only (default: all)")
    parser.add_argument("--seed", type=int, default=None, help="seed of the sampling (default: a fresh draw)")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda when available)")
    parser.add_argument("--num-steps", type=_number(int, 1), default=None,
                        help="iterations of the recurrent-depth layers (default: theirs)")
    parser.add_argument("--exit-threshold", type=_number(float, 0, finite=True), default=None,
                        help="per-token adaptive exit of the recurrent-depth layers (default: off)")
    return parser


def _device(parser, name: str | None) -> torch.device:
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as e:
        parser.error(f"--device {name}: {e}")
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device {name}: no CUDA device is available (torch {torch.__version__})")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        parser.error(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    if device.type not in ("cpu", "cuda"):
        parser.error(f"--device {name}: seqmix runs on cpu or cuda")
    return device


def _load(parser, args, device) -> LanguageModel:
    try:
        model = LanguageModel.from_pretrained(resolve_model_dir(args.run_dir), device=device)
    except (FileNotFoundError, ValueError) as e:
        parser.error(f"RUN_DIR {args.run_dir}: {e}")
    iterates = any(getattr(block.mixer, "takes_steps", False) for block in model.blocks)
    for flag, value in (("--num-steps", args.num_steps), ("--exit-threshold", args.exit_threshold)):
        if value is not None and not iterates:
            parser.error(f"{flag} is given, but the model has no recurrent-depth layer (layers {model.config.layers})")
    vocab = model.config.vocab_size
    if args.top_k is not None and args.top_k > vocab:
        parser.error(f"--top-k {args.top_k} is larger than the model's vocabulary ({vocab})")
    return model.eval()


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.no_bos and not args.prompt:
        parser.error("--no-bos needs a --prompt: there is nothing to continue")
    device = _device(parser, args.device)
    model = _load(parser, args, device)
    prompt = torch.tensor([([] if args.no_bos else [BOS]) + encode(args.prompt)], device=device)
    generator = None
    if args.seed is not None:
        generator = torch.Generator(device=device).manual_seed(args.seed)
    stream = TextStream(sys.stdout)
    stream.write(args.prompt)
    try:
        model.generate(prompt, args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                       generator=generator, num_steps=args.num_steps, exit_threshold=args.exit_threshold,
                       on_token=stream)
    except KeyboardInterrupt:  # Ctrl-C stops the stream: the text so far stands, no traceback
        stream.write("\n")
        sys.exit(130)
    stream.close()
    stream.write("\n")


if __name__ == "__main__":
    main()
