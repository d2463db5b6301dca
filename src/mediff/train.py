"""Training of 2D diffusion priors with the EDM loss (Karras et al. 2022, Sec. 5 and Table 1).

Reproducibility: every step draws its batch indices, noise levels, noise and augmentation from a
``torch.Generator`` seeded by (seed, step). Training is therefore a pure function of the seed and the
step count, and ``resume`` continues exactly where the last checkpoint left off. The global RNG is
never used. Under ``torchrun`` every rank builds the same global batch and takes its own share.

Small data sets (CT: tens of slices) can train on random patches with their pixel coordinates as
extra input channels: Patch Diffusion (Wang et al. 2023, arXiv 2304.12526). A step is a whole-image
step with probability ``full_prob``, else a step on crops of one size from ``patch_sizes``, with
(size / patch)^2 as many crops as images so every step sees the same number of pixels. The network
(``pos_channels = 2``) gets the crop's coordinates; at sampling time it sees the whole image grid.
"""

from __future__ import annotations

import copy
import csv
import json
import math
import os
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
import torch.distributed as dist
from torch import Tensor, nn

from mediff.checkpoint import prefixed, save_checkpoint, split_prefix, to_dtype
from mediff.data import SliceSet, load_slices, split_by_subject
from mediff.denoiser import EDMPrecond, edm_sigma_range
from mediff.errors import MediffError
from mediff.io import atomic_write
from mediff.nets import LeanUNet, UNetConfig, coordinate_grid
from mediff.prior_meta import DataMeta, PriorMeta, crop_tile, read_prior_file

VAL_SIGMAS = (0.05, 0.1, 0.2, 0.5, 1.0)


@dataclass
class TrainConfig:
    """Hyper-parameters of one run (stored in the checkpoint; ``resume`` checks they match)."""

    size: int = 128
    batch: int = 16
    steps: int = 100_000
    lr: float = 2e-4
    warmup_steps: int = 500
    # Learning rate falls linearly to 0 over the last ``decay_steps`` of ``steps`` (0: constant after
    # warm-up). A warm-up/stable/decay schedule (Hu et al. 2024, arXiv 2404.06395; Hägele et al. 2024,
    # arXiv 2405.18392): a run trains at constant rate for as long as wanted and any of its checkpoints
    # can be finished by a short decay, so it may change on resume, like ``steps``.
    decay_steps: int = 0
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    ema_halflife_images: float = 20_000.0
    ema_rampup: float = 0.1  # EMA half-life is at most this fraction of the images seen so far
    p_std: float = 1.2  # log-normal noise level distribution (EDM), mean set from sigma_data
    cond_drop: float = 0.1  # probability of dropping covariates (classifier-free guidance)
    n_val_subjects: int = 20
    checkpoint_every: int = 200
    val_every: int = 1000
    seed: int = 0
    net: dict = field(default_factory=lambda: UNetConfig().to_dict())
    intensity: str = "auto"  # training units: "auto" | "percentile" | "hu" (mediff.data)
    patch_sizes: tuple[int, ...] = ()  # Patch Diffusion crop sizes; () = whole images only
    full_prob: float = 0.5  # with patch_sizes: probability of a whole-image step


def learning_rate(cfg: TrainConfig, step: int) -> float:
    """Learning rate of optimiser step ``step`` (0-based): linear warm-up over ``warmup_steps``, then
    constant, then (``decay_steps`` > 0) linear decay reaching 0 after step ``steps``."""
    warm = min(1.0, (step + 1) / cfg.warmup_steps)
    decay = 1.0 if cfg.decay_steps <= 0 else min(1.0, max(0.0, (cfg.steps - step) / cfg.decay_steps))
    return cfg.lr * warm * decay


def step_generator(seed: int, step: int) -> torch.Generator:
    """The generator for one step: a pure function of (seed, step)."""
    return torch.Generator().manual_seed((seed * 1_000_003 + step) % (2**63 - 1))


def edm_loss(model: nn.Module, sd: float, x0: Tensor, cond: Tensor | None, gen: torch.Generator, p_mean: float,
             p_std: float, pos: Tensor | None = None) -> Tensor:
    """EDM loss: sigma ~ logN(p_mean, p_std), weight (s^2+sd^2)/(s sd)^2, mean squared error.

    ``model`` is the (possibly DDP-wrapped) preconditioned denoiser, ``sd`` its sigma_data; ``pos``
    the coordinate channels of patches (None: whole images).
    """
    b = x0.shape[0]
    # Drawn on the CPU generator whatever x0's device: the same (seed, step) gives the same noise.
    sigma = (torch.randn(b, generator=gen) * p_std + p_mean).exp().to(x0.device)
    noise = torch.randn(x0.shape, generator=gen).to(x0.device)
    weight = (sigma**2 + sd**2) / (sigma * sd) ** 2
    denoised = model(x0 + sigma.view(-1, 1, 1, 1) * noise, sigma, cond, pos)
    return (weight.view(-1, 1, 1, 1) * (denoised - x0) ** 2).mean()


def augment(x: Tensor, gen: torch.Generator, jitter: float = 0.1) -> Tensor:
    """Left-right flips and a global intensity scale in [1 - jitter, 1 + jitter] (jitter 0 for HU,
    whose values are physical; the draw is made either way so the random stream does not depend on it)."""
    b = x.shape[0]
    flip = torch.rand(b, generator=gen) < 0.5
    x = torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)
    return x * ((1 - jitter) + 2 * jitter * torch.rand(b, 1, 1, 1, generator=gen))


def random_crops(x: Tensor, pos: Tensor, p: int, n: int, gen: torch.Generator) -> tuple[Tensor, Tensor, Tensor]:
    """``n`` random p x p crops of the images x (B, C, S, S) and of their coordinate grid pos
    (1, 2, S, S): (crops (n, C, p, p), coordinates (n, 2, p, p), source image index (n,))."""
    b, c, h, w = x.shape
    src = torch.randint(b, (n,), generator=gen)
    top = torch.randint(h - p + 1, (n,), generator=gen)
    left = torch.randint(w - p + 1, (n,), generator=gen)
    rows = (top[:, None] + torch.arange(p))[:, None, :, None]  # (n, 1, p, 1)
    cols = (left[:, None] + torch.arange(p))[:, None, None, :]  # (n, 1, 1, p)
    crops = x[src[:, None, None, None], torch.arange(c)[None, :, None, None], rows, cols]
    coords = pos[0][torch.arange(2)[None, :, None, None], rows, cols]
    return crops, coords, src


class Trainer:
    """Owns model, EMA, optimiser and logs of one run in ``out_dir``."""

    def __init__(self, data: SliceSet, out_dir: Path, cfg: TrainConfig, resume: bool = False,
                 device: torch.device = torch.device("cpu")) -> None:
        self.cfg, self.out, self.device = cfg, Path(out_dir), torch.device(device)
        self.rank, self.world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
        if cfg.batch % self.world:
            raise MediffError(f"batch {cfg.batch} is not divisible by {self.world} processes")
        net = UNetConfig.from_dict(cfg.net)
        multiple = net.multiple
        if cfg.size % multiple:
            raise MediffError(f"--size {cfg.size} must be a multiple of {multiple} for a {len(net.channels)}-level UNet")
        for p in cfg.patch_sizes:
            if p % multiple or not 0 < p < cfg.size:
                raise MediffError(f"patch size {p} must be a multiple of {multiple} below --size {cfg.size}")
        if cfg.patch_sizes and not net.pos_channels:
            raise MediffError("patch training needs the coordinate channels: add --position")
        if not 0.0 <= cfg.full_prob <= 1.0:
            raise MediffError(f"--full-prob must be in [0, 1], got {cfg.full_prob}")
        tr, va = split_by_subject(data.subjects, cfg.n_val_subjects, cfg.seed)
        self.train, self.val = data.subset(tr), data.subset(va)
        self.data = data
        x = self.train.images
        self.data_mean = float(x.mean())
        self.sigma_data = float(x.std())
        net_cfg = UNetConfig.from_dict({**cfg.net, "cond_dim": 0 if data.covariates is None else data.covariates.shape[1]})
        cfg.net = net_cfg.to_dict()
        with torch.random.fork_rng(devices=[]):  # initial weights: a function of the seed, not the global RNG
            torch.manual_seed(cfg.seed)
            # Crops only: the EMA (validation, the shipped prior) denoises whole images tile by tile.
            self.model = EDMPrecond(LeanUNet(net_cfg), self.sigma_data, self.data_mean,
                                    tile=crop_tile(cfg.patch_sizes, cfg.full_prob),
                                    tile_multiple=net_cfg.multiple).to(self.device)
        self.ema = copy.deepcopy(self.model).requires_grad_(False)
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.step, self.images_seen, self.wall = 0, 0, 0.0
        ckpt, compact = self.out / "checkpoint.safetensors", self.out / COMPACT_NAME
        if resume and (ckpt.exists() or compact.exists()):
            self._load(ckpt if ckpt.exists() else compact)
            if self.rank == 0:  # half-written temp files of a killed run (each up to a checkpoint's size)
                for tmp in self.out.glob(".mediff-tmp-*"):
                    tmp.unlink(missing_ok=True)
                self._trim_logs()
        elif resume:
            raise MediffError(f"--resume given but no checkpoint in {self.out}")
        elif ckpt.exists() or compact.exists():
            raise MediffError(f"{self.out} already holds a training run: use --resume to continue it")
        cuda = self.device.type == "cuda"
        cuda_ids = [torch.cuda.current_device() if self.device.index is None else self.device.index] if cuda else None
        self.ddp = (nn.parallel.DistributedDataParallel(self.model, device_ids=cuda_ids) if self.world > 1
                    else self.model)

    # ---- checkpoint -------------------------------------------------------------------------------
    def metadata(self) -> PriorMeta:
        sig_min, sig_max = edm_sigma_range(self.sigma_data)
        sp = self.train.pixel_spacing_mm
        data = DataMeta(source=self.data.source, fingerprint=self.data.fingerprint,
                        n_train_slices=len(self.train.images), n_val_slices=len(self.val.images),
                        val_subjects=tuple(sorted(set(self.val.subjects.tolist()))),
                        pixel_spacing_mm=None if sp is None else (round(float(sp.min()), 4), round(float(sp.max()), 4)))
        return PriorMeta(kind="edm", net=self.cfg.net, sigma_data=self.sigma_data, data_mean=self.data_mean,
                         sigma_min=sig_min, sigma_max=sig_max, image_size=self.cfg.size,
                         normalization=self.data.normalization, covariates=self.data.covariate_spec, data=data,
                         train=asdict(self.cfg), step=self.step, images_seen=self.images_seen,
                         wall_seconds=round(self.wall, 1), torch_version=torch.__version__)

    def save(self) -> None:
        if self.rank:
            return
        meta = self.metadata().to_dict()
        opt = self.opt.state_dict()
        tensors = {**prefixed(self.model.state_dict(), "model"), **prefixed(self.ema.state_dict(), "ema")}
        for i, st in opt["state"].items():
            tensors.update({f"opt.{i}.{k}": torch.as_tensor(v) for k, v in st.items()})
        save_checkpoint(self.out / "checkpoint.safetensors", tensors, meta)
        # The EMA weights alone, in fp16, are the shippable prior (half the size, same quality).
        save_checkpoint(self.out / "prior.safetensors", to_dtype(self.ema.state_dict(), torch.float16), meta)

    def _load(self, path: Path) -> None:
        tensors, meta = read_prior_file(path)
        if meta.data.fingerprint != self.data.fingerprint:
            raise MediffError(f"{path} was trained on other data (fingerprint differs): refusing to resume")
        same = {k: v for k, v in meta.train.items()
                if k not in ("steps", "decay_steps", "checkpoint_every", "val_every")}
        if "net" in same:  # fields added to UNetConfig since the checkpoint was written take their defaults
            same["net"] = json.loads(json.dumps(UNetConfig.from_dict(same["net"]).to_dict()))
        # Compare in JSON form: the stored settings came back from JSON (lists, not tuples).
        mine = json.loads(json.dumps({k: v for k, v in asdict(self.cfg).items() if k in same}))
        if same != mine:
            diff = sorted(k for k in same if same[k] != mine[k])
            raise MediffError(f"cannot resume {path}: settings differ ({', '.join(diff)})")
        if meta.compact and self.rank == 0:
            print(f"resuming from the compact checkpoint {path.name}: weights were rounded to 16 bits and "
                  "Adam's first moments restart at 0 (not bit-exact)")
        self.model.load_state_dict(to_dtype(split_prefix(tensors, "model"), torch.float32))
        self.ema.load_state_dict(to_dtype(split_prefix(tensors, "ema"), torch.float32))
        state = self.opt.state_dict()
        for i, p in enumerate(self.model.parameters()):
            sub = split_prefix(tensors, f"opt.{i}")
            if sub:
                sub = {k: v.float() if k == "exp_avg_sq" else v for k, v in sub.items()}
                sub.setdefault("exp_avg", torch.zeros_like(p))
                state["state"][i] = sub
        self.opt.load_state_dict(state)
        self.step, self.images_seen, self.wall = meta.step, meta.images_seen, meta.wall_seconds

    # ---- one step ---------------------------------------------------------------------------------
    def train_step(self) -> float:
        cfg = self.cfg
        gen = step_generator(cfg.seed, self.step)
        idx = torch.randint(len(self.train.images), (cfg.batch,), generator=gen)
        x0 = augment(self.train.images[idx], gen, 0.0 if self.data.is_hu else 0.1)
        cond = None
        if self.train.covariates is not None:
            keep = (torch.rand(cfg.batch, generator=gen) >= cfg.cond_drop).float()
            cond = self.train.covariates[idx] * keep[:, None]
        pos = None
        if cfg.patch_sizes and float(torch.rand(1, generator=gen)) >= cfg.full_prob:
            p = cfg.patch_sizes[int(torch.randint(len(cfg.patch_sizes), (1,), generator=gen))]
            # Crops of the augmented images, with the whole-image grid: a crop's coordinates say where it sits.
            n = cfg.batch * (cfg.size // p) ** 2
            x0, pos, src = random_crops(x0, coordinate_grid(cfg.size, cfg.size), p, n, gen)
            cond = None if cond is None else cond[src]
        p_mean = -1.2 + math.log(self.sigma_data / 0.5)
        # Every rank builds the same global batch (same generator) and trains on its own share.
        share = slice(self.rank, None, self.world)
        rank_gen = torch.Generator().manual_seed(int(torch.randint(2**62, (1,), generator=gen)) + self.rank)
        dev = self.device
        loss = edm_loss(self.ddp, self.sigma_data, x0[share].to(dev), None if cond is None else cond[share].to(dev),
                        rank_gen, p_mean, cfg.p_std, None if pos is None else pos[share].to(dev))
        for g in self.opt.param_groups:
            g["lr"] = learning_rate(cfg, self.step)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
        self.opt.step()
        self.step += 1
        self.images_seen += cfg.batch
        self._update_ema()
        return float(loss.detach())

    @torch.no_grad()
    def _update_ema(self) -> None:
        half = min(self.cfg.ema_halflife_images, self.images_seen * self.cfg.ema_rampup)
        beta = 0.5 ** (self.cfg.batch / max(half, 1e-8))
        for pe, pm in zip(self.ema.parameters(), self.model.parameters()):
            pe.lerp_(pm.detach(), 1 - beta)

    @torch.no_grad()
    def validate(self, n: int = 64) -> dict[float, float]:
        """EMA denoising MSE (normalised units) on up to ``n`` held-out-subject slices, fixed noise."""
        gen = torch.Generator().manual_seed(1234)
        idx = torch.randperm(len(self.val.images), generator=gen)[:n]
        x0 = self.val.images[idx]
        out = {}
        for s in VAL_SIGMAS:
            noisy = (x0 + s * torch.randn(x0.shape, generator=gen)).to(self.device)
            den = torch.cat([self.ema(c, torch.full((len(c),), s, device=self.device)) for c in noisy.split(16)])
            out[s] = float(((den.cpu() - x0) ** 2).mean())
        return out

    # ---- loop -------------------------------------------------------------------------------------
    def fit(self, progress: bool = True) -> None:
        from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

        cfg = self.cfg
        self.out.mkdir(parents=True, exist_ok=True)
        show = progress and self.rank == 0
        cols = [TextColumn("train"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                TextColumn("loss {task.fields[loss]:.4f}"), TextColumn("{task.fields[ips]:.1f} img/s"),
                TimeRemainingColumn()]
        t_last, loss_acc, n_acc = time.perf_counter(), 0.0, 0
        with Progress(*cols, disable=not show) as bar:
            task = bar.add_task("train", total=cfg.steps, completed=self.step, loss=float("nan"), ips=0.0)
            while self.step < cfg.steps:
                t0 = time.perf_counter()
                loss_acc += self.train_step()
                n_acc += 1
                self.wall += time.perf_counter() - t0
                if self.step % 20 == 0 or self.step == cfg.steps:
                    now = time.perf_counter()
                    ips = n_acc * cfg.batch / (now - t_last)
                    self._log("train.csv", ["step", "images_seen", "loss", "img_per_s", "lr"],
                              [self.step, self.images_seen, loss_acc / n_acc, round(ips, 2), self.opt.param_groups[0]["lr"]])
                    bar.update(task, completed=self.step, loss=loss_acc / n_acc, ips=ips)
                    t_last, loss_acc, n_acc = now, 0.0, 0
                if self.step % cfg.val_every == 0 and self.rank == 0:
                    for s, mse in self.validate().items():
                        self._log("val.csv", ["step", "images_seen", "sigma", "mse", "psnr"],
                                  [self.step, self.images_seen, s, mse, 10 * math.log10(1 / mse)])
                    plot_validation(self.out / "val.csv", self.out / "val.png")
                if self.step % cfg.checkpoint_every == 0 or self.step == cfg.steps:
                    self.save()

    def _trim_logs(self) -> None:
        """Drop the log rows past the resumed step: the run repeats those steps and logs them again."""
        for name in ("train.csv", "val.csv"):
            path = self.out / name
            if not path.exists():
                continue
            with open(path, newline="") as f:
                rows = list(csv.reader(f))
            # A row cut short by a kill goes too.
            keep = rows[:1] + [r for r in rows[1:] if len(r) == len(rows[0]) and r[0].isdigit()
                               and int(r[0]) <= self.step]
            if len(keep) < len(rows):
                atomic_write(path, True, lambda tmp: _write_csv(tmp, keep))

    def _log(self, name: str, header: list[str], row: list) -> None:
        if self.rank:
            return
        path = self.out / name
        new = not path.exists()
        with open(path, "a", newline="") as f:
            w = csv.writer(f)
            if new:
                w.writerow(header)
            w.writerow(row)


COMPACT_NAME = "resume.safetensors"


def _write_csv(path: Path, rows: list[list[str]]) -> None:
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows(rows)


def compact_checkpoint(run: Path) -> Path:
    """Write ``run/resume.safetensors``, a compact resumable state of ``run/checkpoint.safetensors``
    (38 % of its size): model and EMA weights in fp16, Adam's second moments in bf16 (their range
    needs bf16's exponent), first moments dropped (they forget in ~10 steps with beta1 = 0.9).

    It is what a project keeps in version control to continue training in a later session; resuming
    from it is not bit-exact (``Trainer`` says so), resuming from checkpoint.safetensors is.
    """
    tensors, meta = read_prior_file(run / "checkpoint.safetensors")
    out: dict[str, Tensor] = {}
    for k, v in tensors.items():
        if k.startswith("opt.") and k.endswith(".exp_avg"):
            continue
        if k.startswith("opt.") and k.endswith(".exp_avg_sq"):
            out[k] = v.bfloat16()
        elif k.startswith(("model.", "ema.")) and v.is_floating_point():
            out[k] = v.half()
        else:
            out[k] = v
    path = run / COMPACT_NAME
    save_checkpoint(path, out, replace(meta, compact=True).to_dict())
    return path


def prior_from_compact(run: Path) -> Path:
    """Write ``run/prior.safetensors`` (the shippable fp16 EMA weights) from the compact state
    ``run/resume.safetensors``: a fresh clone holds only the compact state, and its EMA is already
    fp16, so the result is the prior that training wrote at that step."""
    tensors, meta = read_prior_file(run / COMPACT_NAME)
    path = run / "prior.safetensors"
    save_checkpoint(path, split_prefix(tensors, "ema"), replace(meta, compact=False).to_dict())
    return path


def plot_validation(csv_path: Path, png_path: Path) -> None:
    """Validation PSNR vs images seen, one line per sigma."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(csv_path, newline="") as f:
        rows = list(csv.DictReader(f))
    fig, ax = plt.subplots(figsize=(6, 4))
    for s in sorted({r["sigma"] for r in rows}, key=float):
        pts = [(int(r["images_seen"]), float(r["psnr"])) for r in rows if r["sigma"] == s]
        ax.plot(*zip(*pts), marker="o", label=f"sigma={s}")
    ax.set_xlabel("images seen")
    ax.set_ylabel("validation PSNR (dB, held-out subjects)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    tmp = png_path.with_name("." + png_path.name + ".tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, png_path)


def resolve_device(device: str = "auto") -> torch.device:
    """The training device: "auto" = CUDA when available, else the CPU; a bare "cuda" is this process's
    GPU (torchrun's LOCAL_RANK). Randomness stays on CPU generators either way (``step_generator``)."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise MediffError(f"unknown --device {device!r}: use auto, cpu or cuda") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise MediffError("--device cuda, but this torch sees no CUDA device")
        if dev.index is None:
            dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(dev)
    elif dev.type != "cpu":
        raise MediffError(f"unsupported --device {device!r}: use auto, cpu or cuda")
    return dev


def init_distributed(device: torch.device) -> bool:
    """Join the process group when launched by torchrun (gloo on CPU, nccl on GPU)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        return True
    return False


def train(data_path: Path, out_dir: Path, cfg: TrainConfig, covariates: Path | None = None,
          resume: bool = False, progress: bool = True, device: str = "auto",
          pixel_spacing: float | None = None) -> Trainer:
    """Load data, split by subject, train to ``cfg.steps`` with checkpoints in ``out_dir`` on ``device``
    (``resolve_device``). ``pixel_spacing``: the data's pixel size in mm when their files do not say."""
    dev = resolve_device(device)
    init_distributed(dev)
    data = load_slices(Path(data_path), cfg.size, covariates, intensity=cfg.intensity, pixel_spacing=pixel_spacing)
    trainer = Trainer(data, out_dir, cfg, resume=resume, device=dev)
    trainer.fit(progress=progress)
    return trainer
