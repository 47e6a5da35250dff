"""python -m diffusion.demo: a local page to play with a trained model, offline, on 127.0.0.1.

Watch 16 digits denoise live, complete a digit you draw or upload (inpainting), and slide between two seeds
(interpolation). It is one small page of our own served by the standard library, not Gradio: nothing more
to install, no asset from the internet and no telemetry, and every image goes through the same code as
`python -m diffusion.sampling` (generation.generate), so the page's final grid equals the command's PNG.

The server streams each run as lines of JSON (one per sampler step, then the result). Runs from several
tabs take turns on the one network (a lock), each with its own settings and random generator.
"""
from __future__ import annotations

import argparse
import base64
import dataclasses
import json
import threading
import webbrowser
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import torch

from diffusion.checkpoint import resolve_checkpoint
from diffusion.config import SAMPLERS, Config
from diffusion.errors import UserError, run_cli
from diffusion.generation import (generate, interpolation_noise, load_for_sampling, load_guide, sample_labels,
                                  settings_for_guide, solver_steps, with_solver_steps)
from diffusion.uploads import REGIONS, decode_square_png, digit_to_model_range, mask_keep, region_keep
from diffusion.visuals import grid_png

PAGE = Path(__file__).with_name("demo_page.html")
MAX_BODY = 8_000_000
GRID = 16  # images per run: a 4 x 4 grid, as `python -m diffusion.sampling` writes by default
ROW = 8  # images in an interpolation row


class Demo:
    """The loaded network and what a request may change; run() turns one request into a stream of frames."""

    def __init__(self, path: Path, overrides: dict):
        self.path = path
        self.net, self.cfg, self.device = load_for_sampling(path, overrides)
        self.weak, _ = load_guide(path, self.cfg, self.device)
        self.cfg = settings_for_guide(self.cfg, overrides, self.weak is not None, labelled=self.cfg.num_classes > 0)
        self.lock = threading.Lock()

    def info(self) -> dict:
        c = self.cfg
        return {"checkpoint": str(self.path), "num_classes": c.num_classes, "samplers": list(SAMPLERS),
                "sampler": c.sampler, "steps": solver_steps(c, guided=c.num_classes > 0), "eta": c.eta,
                "guidance": c.guidance, "seed": c.seed,
                "resample": c.resample, "max_steps": c.timesteps, "regions": list(REGIONS), "image_size": c.image_size}

    def settings(self, request: dict) -> Config:
        """The request's sampler settings on top of the loaded ones, validated like command-line flags."""
        fields = {"sampler": str, "steps": int, "eta": float, "guidance": float, "seed": int, "resample": int}
        names = {"steps": "sample_steps"}
        try:
            changes = {names.get(k, k): cast(request[k]) for k, cast in fields.items() if request.get(k) not in (None, "")}
        except (TypeError, ValueError) as err:
            raise UserError(f"a setting is not a number: {err}") from None
        if changes.get("sampler", self.cfg.sampler) not in SAMPLERS:
            raise UserError(f"sampler must be one of {', '.join(SAMPLERS)}")
        return Config(**{**self.cfg.to_dict(), **changes})

    def inputs(self, request: dict, cfg: Config) -> tuple[int, torch.Tensor | None, dict, int]:
        """(images, labels, generate()'s editing arguments, images per row) for the request's task."""
        task, digit = request.get("task", "sample"), request.get("digit")
        digit = None if digit in (None, "", "any") else int(digit)
        if task == "sample":
            return GRID, sample_labels(cfg, GRID, digit, seed=cfg.seed, device=self.device), {}, 4
        labels = sample_labels(cfg, GRID, digit, unconditional=digit is None, device=self.device)
        if task == "interpolate":
            labels = None if labels is None else labels[:ROW]
            end = request.get("end_seed")
            end = None if end in (None, "") else int(end)
            return ROW, labels, {"x_T": interpolation_noise(cfg, ROW, cfg.seed, end)}, ROW
        if task == "inpaint":
            image = decode_square_png(data_url_bytes(request.get("image")), cfg.image_size, cfg.channels, "image")
            known, _ = digit_to_model_range(image)
            mask = request.get("mask") or "bottom"
            keep = (region_keep(mask, cfg.image_size) if mask in REGIONS else
                    mask_keep(decode_square_png(data_url_bytes(mask), cfg.image_size, cfg.channels, "mask")))
            if keep.all():
                raise UserError("the mask marks nothing to generate; paint over part of the digit or pick a half")
            return GRID, labels, {"known": known.expand(GRID, -1, -1, -1), "keep": keep}, 4
        raise UserError(f"unknown task {task!r}")

    def run(self, request: dict, send) -> None:
        """Validate, then send {'frame', 'of', 'png'} per sampler step and {'done', 'png', 'settings'} last."""
        cfg = self.settings(request)
        if request.get("task") == "interpolate":
            cfg = dataclasses.replace(cfg, eta=0.0)  # neighbours must share their path: the deterministic sampler
        n, labels, editing, nrow = self.inputs(request, cfg)
        cfg = with_solver_steps(cfg, labels)
        with self.lock:
            steps = [0]

            def on_step(i, xt, x0):
                steps[0] += 1
                send({"frame": i + 1, "png": b64(grid_png(xt.clamp(-1, 1), nrow))})

            x = generate(self.net, cfg, n, labels, self.device, seed=cfg.seed, progress=False, callback=on_step,
                         weak=self.weak, **editing)
        send({"done": True, "png": b64(grid_png(x, nrow)), "frames": steps[0],
              "settings": {"sampler": cfg.sampler, "steps": cfg.sample_steps, "eta": cfg.eta,
                           "guidance": cfg.guidance, "seed": cfg.seed}})

    def upload(self, request: dict) -> dict:
        """An uploaded PNG as the 28 x 28 digit the model would see (light strokes on dark)."""
        image = decode_square_png(data_url_bytes(request.get("image")), self.cfg.image_size, self.cfg.channels, "upload")
        known, inverted = digit_to_model_range(image)
        return {"png": b64(grid_png(known[None], nrow=1)), "inverted": inverted}  # one image: saved without padding


def b64(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


def data_url_bytes(value) -> bytes:
    if not isinstance(value, str) or not value:
        raise UserError("no image was sent")
    try:
        return base64.b64decode(value.split(",", 1)[-1], validate=True)
    except ValueError:
        raise UserError("the image is not valid base64 data") from None


def make_handler(demo: Demo):
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):  # keep the terminal for errors
            pass

        def reply(self, status: HTTPStatus, body: bytes, kind: str) -> None:
            self.send_response(status)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-store")
            self.end_headers()
            self.wfile.write(body)

        def reply_json(self, status: HTTPStatus, value: dict) -> None:
            self.reply(status, json.dumps(value).encode(), "application/json")

        def do_GET(self):
            if self.path in ("/", "/index.html"):
                self.reply(HTTPStatus.OK, PAGE.read_bytes(), "text/html; charset=utf-8")
            elif self.path == "/api/info":
                self.reply_json(HTTPStatus.OK, demo.info())
            else:
                self.reply_json(HTTPStatus.NOT_FOUND, {"error": f"no page {self.path}"})

        def do_POST(self):
            length = int(self.headers.get("Content-Length") or 0)
            if length > MAX_BODY:
                self.close_connection = True
                left = length if length <= 8 * MAX_BODY else 0  # drain it, so the sender hears the reply
                while left > 0 and (chunk := self.rfile.read(min(left, 65536))):
                    left -= len(chunk)
                return self.reply_json(HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                                       {"error": f"the upload is {length / 1e6:.1f} MB; at most {MAX_BODY / 1e6:g} MB"})
            try:
                request = json.loads(self.rfile.read(length) or b"{}")
                if not isinstance(request, dict):
                    raise ValueError("not an object")
            except ValueError:
                return self.reply_json(HTTPStatus.BAD_REQUEST, {"error": "the request is not JSON"})
            try:
                if self.path == "/api/upload":
                    return self.reply_json(HTTPStatus.OK, demo.upload(request))
                if self.path == "/api/run":
                    return self.stream(request)
                self.reply_json(HTTPStatus.NOT_FOUND, {"error": f"no endpoint {self.path}"})
            except UserError as err:
                self.reply_json(HTTPStatus.BAD_REQUEST, {"error": str(err)})

        def stream(self, request: dict) -> None:
            """Lines of JSON as the sampler goes; errors before the first line are a plain 400."""
            started = []

            def send(message: dict) -> None:
                if not started:
                    self.send_response(HTTPStatus.OK)
                    self.send_header("Content-Type", "application/x-ndjson")
                    self.send_header("Cache-Control", "no-store")
                    self.end_headers()
                    started.append(True)
                self.wfile.write(json.dumps(message).encode() + b"\n")
                self.wfile.flush()

            try:
                demo.run(request, send)
            except UserError as err:
                if started:
                    return send({"error": str(err)})
                raise
            except (BrokenPipeError, ConnectionResetError):  # the tab was closed: stop sampling for it
                self.close_connection = True

    return Handler


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m diffusion.demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default=None,
                        help="checkpoint file or exported folder (default: the latest in --ckpt-dir)")
    parser.add_argument("--ckpt-dir", default=Config().ckpt_dir, help="where to look (default: %(default)s)")
    parser.add_argument("--port", type=int, default=7860, help="port on 127.0.0.1 (default: %(default)s; 0 = any free)")
    parser.add_argument("--device", default=None, help="torch device (default: auto)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's)")
    parser.add_argument("--amp", choices=("auto", "bf16", "none"), default=None, help="bf16 autocast (default: auto)")
    parser.add_argument("--memory-format", choices=("auto", "channels_last", "contiguous"), default=None,
                        help="convolution memory format (default: auto)")
    parser.add_argument("--open", action="store_true", help="open the page in the default browser")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    args = parser.parse_args(argv)
    overrides = {k: v for k, v in vars(args).items() if k in ("device", "threads", "amp", "memory_format") and v is not None}
    if args.threads:
        torch.set_num_threads(args.threads)
    demo = Demo(resolve_checkpoint(args.checkpoint, args.ckpt_dir), overrides)
    try:
        server = ThreadingHTTPServer(("127.0.0.1", args.port), make_handler(demo))
    except OSError as err:
        raise UserError(f"cannot listen on 127.0.0.1:{args.port}: {err.strerror or err}; try --port 0") from None
    server.daemon_threads = True
    url = f"http://127.0.0.1:{server.server_address[1]}/"
    print(f"demo of {demo.path} at {url} (Ctrl+C to stop)", flush=True)
    if args.open:
        webbrowser.open(url)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


if __name__ == "__main__":
    run_cli(main)
