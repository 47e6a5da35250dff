"""python -m diffusion.demo: a local page to play with a trained model, offline, on 127.0.0.1.

Watch 16 digits denoise live, complete a digit you draw or upload (inpainting), and slide between two seeds
(interpolation). It is one small page of our own served by the standard library: nothing more to install, no
asset from the internet and no telemetry. Each request's settings go through the same checks and the same
recipe (diffusion/recipe.py) as `python -m diffusion.sampling`, so the page's final grid equals the command's PNG.

The server trusts only its own page: a request must name this server in Host, come from no other Origin, send
JSON, and stay within the command line's limits; the page cannot be framed. Runs from several tabs take turns on
the one network; a run stops when its tab goes away.
"""
from __future__ import annotations

import base64
import dataclasses
import json
import re
import shlex
import threading
import webbrowser
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import torch

from diffusion.autotune import setup_runtime
from diffusion.checkpoint import load_network, resolve_checkpoint
from diffusion.cli import build_parser, parse, run_cli
from diffusion.config import MAX_SEED, SAMPLERS, DataConfig, RuntimeConfig, SampleConfig, build, flag_name
from diffusion.dataloader import test_digit, to_unit_range
from diffusion.diffusion_utils import q_sample, schedule_from_config
from diffusion.errors import UserError
from diffusion.generation import generate, interpolation_noise, load_guide, sample_labels
from diffusion.recipe import choose_recipe
from diffusion.uploads import REGIONS, decode_square_png, digit_to_model_range, mask_keep, region_keep
from diffusion.visuals import grid_png, with_inpainting_input

PAGE = Path(__file__).with_name("demo_page.html")
MAX_BODY = 8_000_000
GRID = 16  # images per run: a 4 x 4 grid, as `python -m diffusion.sampling` writes by default
ROW = 8  # images in an interpolation row
WAIT_FOR_TURN = 120  # seconds a run waits for the network before it is told the server is busy
REQUEST_SETTINGS = {"sampler": "sampler", "steps": "sample_steps", "eta": "eta", "guidance": "guidance",
                    "resample": "resample"}
PAGE_NAMES = {"sample_steps": "steps", "guidance": "guidance w", "eta": "eta", "resample": "resample",
              "sampler": "sampler"}  # what the page calls a setting, in its messages
FLAG_WORDS = {"--steps": "steps", "--guidance": "guidance w", "--eta": "eta", "--resample": "resample",
              "--digit": "digit", "--unconditional": "digit 'any'"}  # the recipe's messages, in the page's words


class Demo:
    """The loaded network; run() turns one request into a stream of frames, with the command line's recipe."""

    def __init__(self, path: Path, asked: SampleConfig, runtime_cfg: RuntimeConfig, data: DataConfig | None = None):
        self.loaded = load_network(path)
        self.asked, self.runtime_cfg = asked, runtime_cfg
        self.data = data or DataConfig()
        self.schedule = schedule_from_config(self.loaded.config)
        self.guides: dict[Path, torch.nn.Module] = {}
        self.lock = threading.Lock()

    @property
    def model(self):
        return self.loaded.config

    def info(self) -> dict:
        """What the page needs to draw its form: the recipe each task gets when a field is left empty."""
        recipes = {}
        for task in ("sample", "inpaint", "interpolate"):
            for labelled in (True, False):
                try:
                    r = self.recipe({"task": task}, labelled)
                except UserError:
                    continue
                recipes[f"{task}/{'labelled' if labelled else 'unlabelled'}"] = {
                    "sampler": r.sampler, "steps": r.steps, "eta": r.eta, "guidance": r.guidance,
                    "resample": r.resample, "text": str(r)}
        return {"checkpoint": self.loaded.path.name, "num_classes": self.model.num_classes, "samplers": list(SAMPLERS),
                "seed": self.runtime_cfg.seed, "max_steps": self.model.timesteps, "regions": list(REGIONS),
                "image_size": self.model.image_size, "recipes": recipes}

    def recipe(self, request: dict, labelled: bool):
        """The request's settings, checked like flags, over the command line's, turned into a recipe."""
        given = {}
        for key, name in REQUEST_SETTINGS.items():
            value = request.get(key)
            if value not in (None, ""):
                given[name] = number(value, key) if key != "sampler" else value
        asked = build(SampleConfig, {**self.asked.to_dict(), **given}, names=PAGE_NAMES)
        try:
            return choose_recipe(self.model, asked, task=request.get("task", "sample"), labelled=labelled,
                                 checkpoint=self.loaded.path, epoch=self.loaded.epoch)
        except UserError as err:
            raise UserError(in_page_words(str(err))) from None

    def guide(self, recipe):
        if recipe.guide is None:
            return None
        if recipe.guide not in self.guides:  # loaded once per guide, then kept for the next requests
            self.guides[recipe.guide] = load_guide(recipe, self.loaded)
        return self.guides[recipe.guide]

    def inputs(self, request: dict, seed: int) -> tuple[str, torch.Tensor | None, dict, int]:
        """(task, labels, generate()'s editing arguments, images per row) for the request."""
        task, digit = request.get("task", "sample"), request.get("digit")
        digit = None if digit in (None, "", "any") else integer(digit, "digit")
        if task == "sample":
            return task, sample_labels(self.model, GRID, digit, seed=seed), {}, 4
        labels = sample_labels(self.model, GRID, digit, unconditional=digit is None)
        if task == "interpolate":
            end = request.get("end_seed")
            end = None if end in (None, "") else seed_value(end, "end_seed")
            return task, None if labels is None else labels[:ROW], {"x_T": interpolation_noise(self.model, ROW, seed, end)}, ROW
        if task == "inpaint":
            size, channels = self.model.image_size, self.model.channels
            known, _ = digit_to_model_range(decode_square_png(data_url_bytes(request.get("image")), size, channels, "image"))
            mask = request.get("mask") or "bottom"
            keep = (region_keep(mask, size) if mask in REGIONS else
                    mask_keep(decode_square_png(data_url_bytes(mask), size, channels, "mask")))
            if keep.all():
                raise UserError("the mask marks nothing to generate; paint over part of the digit or pick a half")
            return task, labels, {"known": known.expand(GRID, -1, -1, -1), "keep": keep}, 4
        raise UserError(f"unknown task {str(task)[:40]!r}")

    def run(self, request: dict, send) -> None:
        """Validate, then send {'frame', 'of', 'png'} per sampler step and {'done', 'png', 'recipe'} last."""
        seed = self.runtime_cfg.seed if request.get("seed") in (None, "") else seed_value(request["seed"], "seed")
        task, labels, editing, nrow = self.inputs(request, seed)
        recipe = self.recipe(request, labelled=labels is not None)
        n = len(labels) if labels is not None else (ROW if task == "interpolate" else GRID)
        if not self.lock.acquire(timeout=WAIT_FOR_TURN):
            raise UserError("the demo is busy with another tab's run; try again in a moment")
        try:
            weak = self.guide(recipe)
            runtime = setup_runtime(self.runtime_cfg, self.model, self.loaded.net, "sample", min(recipe.batch, n),
                                    verbose=False)
            frames = [0]

            def on_step(i, xt, x0):
                frames[0] += 1
                send({"frame": i + 1, "of": recipe.steps, "png": b64(grid_png(xt.clamp(-1, 1), nrow)),
                      "x0": b64(grid_png(x0.clamp(-1, 1), nrow))})

            x = generate(self.loaded.net, self.model, recipe, n, labels, runtime, seed=seed, weak=weak,
                         progress=False, callback=on_step, **editing)
        finally:
            self.lock.release()
        grid = (grid_png(with_inpainting_input(editing["known"][0], editing["keep"], x, nrow), nrow + 1)
                if task == "inpaint" else grid_png(x, nrow))
        send({"done": True, "png": b64(grid), "frames": frames[0], "recipe": str(recipe),
              "command": self.command(request, task, seed),
              "settings": {"sampler": recipe.sampler, "steps": recipe.steps, "eta": recipe.eta,
                           "guidance": recipe.guidance, "seed": seed}})

    def command(self, request: dict, task: str, seed: int) -> str:
        """The `python -m diffusion.sampling` line that draws the same images as this request."""
        words = ["python", "-m", "diffusion.sampling", "--checkpoint", str(self.loaded.path)]
        digit = request.get("digit")
        if digit not in (None, "", "any"):
            words += ["--digit", str(digit)]
        if task == "interpolate":
            end = request.get("end_seed")
            words += ["--interpolate", *([str(end)] if end not in (None, "") else []), "--num-images", str(ROW)]
        if task == "inpaint":
            mask, index = request.get("mask") or "bottom", request.get("test_index")
            digit_source = "your_digit.png" if index in (None, "") else str(integer(index, "test_index"))
            words += ["--inpaint", digit_source, "--mask", mask if mask in REGIONS else "your_mask.png"]
        words += ["--seed", str(seed)]
        fields = {f.name: f for f in dataclasses.fields(SampleConfig)}
        started = {name: getattr(self.asked, name) for name, f in fields.items()
                   if getattr(self.asked, name) != f.default}  # the demo's own flags
        typed = {name: request[key] for key, name in REQUEST_SETTINGS.items() if request.get(key) not in (None, "")}
        for name, value in {**started, **typed}.items():
            flag = fields[name].metadata["alias"] or flag_name(name)  # the shorter spelling, as the help shows
            words += [flag, *(map(str, value) if isinstance(value, tuple) else [str(value)])]
        return shlex.join(words)

    def forward(self, request: dict) -> dict:
        """x_t = q_sample(x_0, t, eps) for the page's digit, with what describes step t."""
        t = integer(request.get("t"), "t")
        if not 0 <= t < self.schedule.T:
            raise UserError(f"t must be in 0..{self.schedule.T - 1}, got {t}")
        seed = self.runtime_cfg.seed if request.get("seed") in (None, "") else seed_value(request["seed"], "seed")
        x0, _ = digit_to_model_range(decode_square_png(data_url_bytes(request.get("image")), self.model.image_size,
                                                       self.model.channels, "digit"))
        eps = torch.randn((1, *x0.shape), generator=torch.Generator().manual_seed(seed))
        xt = q_sample(x0[None], torch.tensor([t]), eps, self.schedule)
        alpha_bar = self.schedule.alpha_bar[t].item()
        return {"png": b64(grid_png(xt.clamp(-1, 1), nrow=1)), "t": t, "alpha_bar": alpha_bar,
                "snr": alpha_bar / (1 - alpha_bar), "signal": alpha_bar ** 0.5, "noise": (1 - alpha_bar) ** 0.5,
                "mean": xt.mean().item(), "std": xt.std().item()}

    def test_digit(self, request: dict) -> dict:
        """MNIST test digit number `index`, as a PNG for the page's drawing pad."""
        image, label = test_digit(self.data, integer(request.get("index"), "the test digit's number"))
        return {"png": b64(grid_png(to_unit_range(image[None]), nrow=1)), "label": label}

    def upload(self, request: dict) -> dict:
        """An uploaded PNG as the 28 x 28 digit the model would see (light strokes on dark)."""
        image = decode_square_png(data_url_bytes(request.get("image")), self.model.image_size, self.model.channels,
                                  "upload")
        known, inverted = digit_to_model_range(image)
        return {"png": b64(grid_png(known[None], nrow=1)), "inverted": inverted}  # one image: saved without padding


def in_page_words(message: str) -> str:
    """A recipe's message with the page's names for what the command line calls flags."""
    return re.sub(r"--[a-z-]+\b(?!-)", lambda m: FLAG_WORDS.get(m.group(), m.group()), message)


def number(value, name: str) -> float:
    """A number from a request: JSON numbers, or the text of a form field."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)) or len(str(value)) > 40:
        raise UserError(f"{name} must be a number, got {str(value)[:40]!r}")
    try:
        result = float(value)
    except ValueError:
        raise UserError(f"{name} must be a number, got {value!r}") from None
    return int(result) if result.is_integer() and name in ("steps", "resample") else result


def integer(value, name: str) -> int:
    result = number(value, name)
    if not float(result).is_integer():
        raise UserError(f"{name} must be a whole number, got {value!r}")
    return int(result)


def seed_value(value, name: str) -> int:
    seed = integer(value, name)
    if not 0 <= seed <= MAX_SEED:
        raise UserError(f"{name} must be in 0..{MAX_SEED}, got {seed}")
    return seed


def b64(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


def data_url_bytes(value) -> bytes:
    if not isinstance(value, str) or not value:
        raise UserError("no image was sent")
    try:
        return base64.b64decode(value.split(",", 1)[-1], validate=True)
    except ValueError:
        raise UserError("the image is not valid base64 data") from None


def make_handler(demo: Demo, hosts: set[str]):
    """The HTTP handler. `hosts`: the Host values this server answers to (its own address)."""
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):  # keep the terminal for errors
            pass

        def reply(self, status: HTTPStatus, body: bytes, kind: str) -> None:
            self.send_response(status)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(body)))
            self.security_headers()
            self.end_headers()
            self.wfile.write(body)

        def security_headers(self) -> None:
            self.send_header("Cache-Control", "no-store")
            self.send_header("X-Frame-Options", "DENY")
            self.send_header("Content-Security-Policy", "frame-ancestors 'none'")
            self.send_header("X-Content-Type-Options", "nosniff")

        def reply_json(self, status: HTTPStatus, value: dict) -> None:
            self.reply(status, json.dumps(value).encode(), "application/json")

        def refused(self) -> str | None:
            """Why this request is not from our own page, or None. DNS rebinding sends a foreign Host; another
            site's form or fetch sends its own Origin (or 'null' from a sandboxed frame or a file)."""
            if self.headers.get("Host", "") not in hosts:
                return "this demo answers only to its own address"
            origin = self.headers.get("Origin")
            if origin is not None and origin.removeprefix("http://") not in hosts:
                return "requests from other sites are refused"
            return None

        def do_GET(self):
            if why := self.refused():
                return self.reply_json(HTTPStatus.FORBIDDEN, {"error": why})
            if self.path in ("/", "/index.html"):
                self.reply(HTTPStatus.OK, PAGE.read_bytes(), "text/html; charset=utf-8")
            elif self.path == "/api/info":
                self.reply_json(HTTPStatus.OK, demo.info())
            else:
                self.reply_json(HTTPStatus.NOT_FOUND, {"error": "no such page"})

        def do_POST(self):
            if why := self.refused():
                return self.reply_json(HTTPStatus.FORBIDDEN, {"error": why})
            request, error = self.read_json()
            if error:
                self.close_connection = True
                return self.reply_json(*error)
            try:
                if self.path == "/api/upload":
                    return self.reply_json(HTTPStatus.OK, demo.upload(request))
                if self.path == "/api/forward":
                    return self.reply_json(HTTPStatus.OK, demo.forward(request))
                if self.path == "/api/test-digit":
                    return self.reply_json(HTTPStatus.OK, demo.test_digit(request))
                if self.path == "/api/run":
                    return self.stream(request)
                self.reply_json(HTTPStatus.NOT_FOUND, {"error": "no such endpoint"})
            except UserError as err:
                self.reply_json(HTTPStatus.BAD_REQUEST, {"error": str(err)})

        def read_json(self) -> tuple[dict | None, tuple | None]:
            """(the request's JSON object, None) or (None, (status, error)), never reading past MAX_BODY."""
            if self.headers.get("Content-Type", "").split(";")[0].strip() != "application/json":
                return None, (HTTPStatus.UNSUPPORTED_MEDIA_TYPE, {"error": "send JSON (Content-Type: application/json)"})
            if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
                return None, (HTTPStatus.LENGTH_REQUIRED, {"error": "send the body with a Content-Length"})
            text = self.headers.get("Content-Length", "")
            if not text.isdigit() or len(text) > 12:
                return None, (HTTPStatus.LENGTH_REQUIRED, {"error": "Content-Length must be a whole number"})
            length = int(text)
            if length > MAX_BODY:
                left = length if length <= 8 * MAX_BODY else 0  # drain it, so the sender hears the reply
                while left > 0 and (chunk := self.rfile.read(min(left, 65536))):
                    left -= len(chunk)
                return None, (HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                              {"error": f"the upload is {length / 1e6:.1f} MB; at most {MAX_BODY / 1e6:g} MB"})
            try:
                request = json.loads(self.rfile.read(length) or b"{}", parse_constant=_no_constant)
            except (ValueError, RecursionError):
                return None, (HTTPStatus.BAD_REQUEST, {"error": "the request is not JSON"})
            if not isinstance(request, dict):
                return None, (HTTPStatus.BAD_REQUEST, {"error": "the request must be a JSON object"})
            return request, None

        def stream(self, request: dict) -> None:
            """Lines of JSON as the sampler goes; errors before the first line are a plain 400."""
            started = []

            def send(message: dict) -> None:
                if not started:
                    self.send_response(HTTPStatus.OK)
                    self.send_header("Content-Type", "application/x-ndjson")
                    self.security_headers()
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


def _no_constant(name: str):
    raise ValueError(f"{name} is not a number this demo takes")


def parser():
    p = build_parser("demo", __doc__.splitlines()[0], SampleConfig, (RuntimeConfig, (
        "device", "threads", "amp", "memory_format", "seed", "ckpt_dir")), (DataConfig, ("data_root",)))
    p.add_argument("--checkpoint", default=None,
                   help="checkpoint file or exported folder (default: the latest in --ckpt-dir)")
    p.add_argument("--port", type=int, default=7860, help="port on 127.0.0.1 (default: %(default)s; 0 = any free)")
    p.add_argument("--open", action="store_true", default=False, help="open the page in the default browser")
    return p


def main(argv: list[str] | None = None) -> None:
    args, configs = parse(parser(), argv)
    if not 0 <= args.port <= 65535:
        raise UserError(f"--port must be in 0..65535, got {args.port}")
    runtime_cfg = configs[RuntimeConfig]
    demo = Demo(resolve_checkpoint(args.checkpoint, runtime_cfg.ckpt_dir), configs[SampleConfig], runtime_cfg,
                configs[DataConfig])
    try:
        server = ThreadingHTTPServer(("127.0.0.1", args.port), None)
    except OSError as err:
        raise UserError(f"cannot listen on 127.0.0.1:{args.port}: {err.strerror or err}; try --port 0") from None
    port = server.server_address[1]
    server.RequestHandlerClass = make_handler(demo, {f"127.0.0.1:{port}", f"localhost:{port}"})
    server.daemon_threads = True
    url = f"http://127.0.0.1:{port}/"
    print(f"demo of {demo.loaded.path} at {url} (Ctrl+C to stop)", flush=True)
    if args.open:
        webbrowser.open(url)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    run_cli(main)
