"""The per-method measurement that `slimtune bench` runs, each call in a fresh process.

`measure_method` builds one tuning method (see `qst.baselines`), marks set-up done, trains
with the shared loop (`eval.train.train`) for `max(train_steps, warmup + steps)` steps on the
task's training batches, times steps `warmup .. warmup + steps`, and scores the task's test
split. Every method runs its LM head and loss only at the labelled positions (QST by itself,
the others through `qst.baselines.labelled_positions_loss`). `measure_forward_floor` times a
no-grad forward pass of the 4-bit backbone's decoder stack (all hidden states kept, no LM head,
no KV cache): a QST step runs exactly that and then only the side network and the LM head on
the labelled positions, so it cannot cost less.

Both are `eval.measure.run_in_fresh_process` targets: keyword arguments and results are plain
JSON. Memory of a method is measured around its training only (scoring the test split
afterwards runs at another batch size and is not part of a training step's cost): on CUDA
`max_memory_allocated` (weights included); on CPU the peak RSS during training minus the RSS
at its start, to which the parent adds `parameter_bytes` (returned here) so that both devices
report "weights + training state".
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from typing import Any

import torch

from eval.errors import UserInputError, require_positive, require_positive_number
from eval.tuning_methods import QST_REDUCTION
from qst.baselines import DEFAULT_METHODS

LOSS_WINDOW = 5  # final_loss: mean of the last steps' losses (one batch is noisy)


def _batches(task_name: str | dict | None, tokenizer, vocab_size: int, batch: int, seq: int, n_steps: int,
             seed: int, train_examples: int | None = None) -> list[dict[str, torch.Tensor]]:
    """The training batches every method sees (one epoch; eval.train cycles it): the task's
    prompt+answer batches (the first `train_examples` of a seeded shuffle), or random tokens."""
    if tokenizer is not None:
        from eval.tasks import lm_batches, load_task

        task = load_task(task_name)
        batches = lm_batches(task, "train", tokenizer, batch, seq, shuffle=True, seed=seed)
        # Fixed shapes: a smaller final batch would make its step look faster.
        batches = [b for b in batches if b["input_ids"].shape[0] == batch]
        if train_examples is not None:
            batches = batches[:train_examples // batch]
        if not batches:
            raise UserInputError(
                f"task {task.name!r} gives no full batch of {batch} training examples"
                + (f" from {train_examples} examples" if train_examples is not None else "")
                + "; use a smaller batch or more training examples"
            )
        return batches
    generator = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(min(n_steps, 8)):  # random tokens: the LM loss over every position
        ids = torch.randint(0, vocab_size, (batch, seq), generator=generator)
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()})
    return out


def _check_sizes(batch: int, seq: int, steps: int, warmup: int, train_steps: int) -> None:
    for name, value, low in (("batch", batch, 1), ("seq", seq, 1), ("steps", steps, 1),
                             ("warmup", warmup, 0), ("train_steps", train_steps, 0)):
        if not isinstance(value, int) or value < low:
            raise UserInputError(f"{name} must be an integer >= {low}, got {value!r}")


def measure_method(method: str, model: str | None = "ref-lm", arch: str | None = None,
                   task: str | dict | None = None, batch: int = 16, seq: int = 512, steps: int = 5,
                   warmup: int = 2, train_steps: int = 0, lr: float = 2e-4, device: str = "cpu",
                   dtype: str | None = None, seed: int = 0, eval_examples: int | None = None,
                   eval_batch_size: int = 8, baseline_options: dict | None = None,
                   train_examples: int | None = None, feature_cache: bool = False, schedule: str = "constant",
                   warmup_ratio: float = 0.03) -> dict[str, Any]:
    """Build `method`, train it, and return its numbers (a `run_in_fresh_process` target).

    `dtype`: what every method of the run computes in (the 16-bit backbone's weights, or the
    4-bit backbone's compute dtype). `train_examples`: train on the first that many (shuffled)
    task examples, so that a short run sees them for several epochs. `feature_cache`: a
    side-tuning method (QST, LST) keeps its frozen backbone's hidden states of each training
    batch in a fresh on-disk cache, attached only after the timed steps: timed steps never read
    or write it (the result's `feature_cache` counts both during them), and the steps that read
    it are timed apart (`cached_step_s`), the cache's own benefit.
    """
    import tempfile

    from eval.measure import count_parameters, mark_setup_done, parameter_bytes, peak_memory
    from eval.train import TrainConfig, train
    from qst.baselines import BaselineConfig, build_tuning_model, labelled_positions_loss

    _check_sizes(batch, seq, steps, warmup, train_steps)
    torch.manual_seed(seed)
    config = BaselineConfig(**(baseline_options or {}))
    tuned, tokenizer = build_tuning_model(method, model=model, arch=arch, device=device, dtype=dtype,
                                          config=config)
    # Random weights (arch) have no task to score: train only the timed steps.
    total_steps = max(train_steps, warmup + steps) if tokenizer is not None else warmup + steps
    batches = _batches(task, tokenizer, tuned.config.vocab_size, batch, seq, total_steps, seed, train_examples)
    trainable = count_parameters(tuned, trainable_only=True)
    total = count_parameters(tuned)
    weights_bytes = parameter_bytes(tuned)
    side_tuning = hasattr(tuned, "parameter_groups")  # qst, lst: their own groups and loss
    cache_dir = None
    if feature_cache and side_tuning:
        cache_dir = tempfile.TemporaryDirectory(prefix="slimtune-bench-features-")
    watch = StepWatch(tuned, timed=range(warmup, warmup + steps),
                      loss_fn=None if side_tuning else labelled_positions_loss,
                      cache_root=cache_dir.name if cache_dir is not None else None)
    mark_setup_done()

    trained = {}

    def run_training():
        trained["result"] = train(
            tuned, batches, TrainConfig(max_steps=total_steps, lr=lr, seed=seed, max_grad_norm=1.0,
                                             schedule=schedule, warmup_ratio=warmup_ratio),
            desc=f"bench {method}", param_groups=tuned.parameter_groups(lr) if side_tuning else None,
            loss_fn=watch.loss,
        )

    # Training only: scoring afterwards runs at another batch size and is not part of a step's cost.
    try:
        peak = peak_memory(run_training, tuned.device)
    finally:
        watch.close()
    result = trained["result"]
    timed = result.step_times[warmup:warmup + steps]
    step_time = statistics.median(timed)
    cache_stats = watch.cache_report(result.step_times, step_time)
    if cache_dir is not None:
        cache_dir.cleanup()
    accuracy, scored, scores = None, 0, {}
    if tokenizer is not None and train_steps > 0:
        from eval.tasks import load_task, task_scores

        tuned.eval()
        scored_task = load_task(task)
        scored = len(scored_task.test[:eval_examples] if eval_examples is not None else scored_task.test)
        with torch.no_grad():  # instruction tasks: held-out loss and perplexity of the responses
            scores = task_scores(tuned, tokenizer, scored_task, split="test", batch_size=eval_batch_size,
                                 max_examples=eval_examples, seq_len=seq)
        accuracy = scores.get("accuracy")
    losses = result.losses[-LOSS_WINDOW:]
    return {
        "method": method,
        "trainable_params": trainable,
        "total_params": total,
        "trainable_share": trainable / total,
        "parameter_bytes": weights_bytes,
        "peak_memory_bytes": peak,
        # CUDA counts the weights already; on CPU the parent adds their bytes (see _peak_bytes)
        "memory_measure": "torch.cuda.max_memory_allocated" if tuned.device.type == "cuda" else "peak RSS increment",
        "step_time_s": step_time,
        "tokens_per_s": batch * seq / step_time,
        "compute_dtype": watch.compute_dtype,
        "linear_dtypes": watch.linear_dtypes,
        "final_loss": sum(losses) / len(losses) if losses and all(map(math.isfinite, losses)) else None,
        "accuracy": accuracy,
        "accuracy_se": _standard_error(accuracy, scored),
        "heldout_loss": scores.get("loss"),
        "perplexity": scores.get("perplexity"),
        "examples_scored": scored,
        "train_time_s": sum(result.step_times),
        "feature_cache": cache_stats,
        "steps_trained": result.steps,
        "losses": result.losses,
        "labelled_tokens": max(_labelled_tokens(b) for b in batches),
    }


class StepWatch:
    """The loss function of a bench run, which also watches each optimizer step (one call per step:
    the bench trains without gradient accumulation).

    - The feature cache (side tuning only, `cache_root` given) is attached to the model only once
      the timed steps are over; per step it records the cache's hits and writes (every miss is
      written), so `cache_report` says, measured, that the timed steps neither read nor wrote it.
    - On the first step, forward hooks on every `nn.Linear` but the LM head (which PEFT's QLoRA
      keeps in fp32, and which runs only at labelled positions) record the dtype its matmul ran in
      and its multiply-adds: the method's compute dtype is the one carrying most of them.
    """

    def __init__(self, model, timed: range, loss_fn=None, cache_root: str | None = None):
        self.model, self.timed, self.loss_fn = model, timed, loss_fn
        self.cache = None
        self.cache_root = cache_root
        self.step = 0
        self.per_step: list[tuple[int, int]] = []  # (hits, writes) of each step
        self._elements: dict[str, int] = {}  # dtype -> multiply-adds of the first step's forward
        vocab = model.config.vocab_size
        self._hooks = [m.register_forward_hook(self._record_dtype) for m in model.modules()
                       if isinstance(m, torch.nn.Linear) and m.out_features != vocab]

    def _record_dtype(self, module, args, output) -> None:
        # A 4-bit Linear casts its input to its compute dtype and its output back to the input's
        # dtype (fp32 after prepare_model_for_kbit_training): its matmul runs in `compute_dtype`.
        dtype = getattr(module, "compute_dtype", None) or getattr(output, "dtype", None)
        if isinstance(dtype, torch.dtype) and isinstance(output, torch.Tensor):
            name = str(dtype).removeprefix("torch.")
            rows = output.numel() // max(1, output.shape[-1])
            self._elements[name] = self._elements.get(name, 0) + rows * module.in_features * module.out_features

    def loss(self, model, batch) -> torch.Tensor:
        if self.step == self.timed.stop and self.cache_root is not None:
            self.cache = self.model.enable_feature_cache(self.cache_root)
        before = self._cache_counts()
        value = model(**batch).loss if self.loss_fn is None else self.loss_fn(model, batch)
        after = self._cache_counts()
        self.per_step.append((after[0] - before[0], after[1] - before[1]))
        if self.step == 0:
            self.close()  # one step's dtypes are every step's
        self.step += 1
        return value

    def _cache_counts(self) -> tuple[int, int]:
        return (self.cache.hits, self.cache.misses) if self.cache is not None else (0, 0)

    def close(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks = []

    @property
    def linear_dtypes(self) -> dict[str, float]:
        """Share of the first step's Linear multiply-adds (LM head aside) run in each dtype."""
        total = sum(self._elements.values()) or 1
        return {k: v / total for k, v in sorted(self._elements.items())}

    @property
    def compute_dtype(self) -> str | None:
        return max(self._elements, key=self._elements.get) if self._elements else None

    def cache_report(self, step_times: list[float], uncached_step_s: float) -> dict[str, Any] | None:
        """None without a cache; else hits and writes during the timed steps (both 0 by design),
        in the whole run, and the median step that read the cache against the uncached timed one."""
        if self.cache_root is None:
            return None
        timed = [self.per_step[i] for i in self.timed if i < len(self.per_step)]
        hit_times = [t for t, (hits, _) in zip(step_times, self.per_step) if hits]
        cached = statistics.median(hit_times) if hit_times else None
        return {
            "timed_hits": sum(h for h, _ in timed),
            "timed_writes": sum(w for _, w in timed),
            "hits": sum(h for h, _ in self.per_step),
            "writes": sum(w for _, w in self.per_step),
            "cached_step_s": cached,
            "uncached_step_s": uncached_step_s,
            "cached_over_uncached": _ratio(cached, uncached_step_s),
        }


def _labelled_tokens(batch: dict[str, torch.Tensor]) -> int:
    """Positions of a batch that predict a label: where the LM head and the loss run."""
    return int((batch["labels"][:, 1:] != -100).sum())


def _standard_error(accuracy: float | None, n: int) -> float | None:
    """Binomial standard error of an accuracy measured on n examples."""
    if accuracy is None or n < 1:
        return None
    return math.sqrt(accuracy * (1 - accuracy) / n)


def measure_forward_floor(model: str | None = "ref-lm", arch: str | None = None, task: str | dict | None = None,
                          batch: int = 16, seq: int = 512, steps: int = 5, warmup: int = 2,
                          device: str = "cpu", seed: int = 0, dtype: str | None = None) -> dict[str, Any]:
    """Median time and peak memory of one no-grad forward pass of the 4-bit NF4 backbone's decoder,
    computing in `dtype` (the run's; None: `eval.bnb.compute_dtype(device)`)."""
    from eval.measure import mark_setup_done, median_step_time, parameter_bytes
    from qst.baselines import load_backbone

    _check_sizes(batch, seq, steps, warmup, 0)
    backbone, tokenizer = load_backbone("qst", model=model, arch=arch, device=device, dtype=dtype)
    backbone.eval()
    batches = _batches(task, tokenizer, backbone.config.vocab_size, batch, seq, 1, seed)
    inputs = {k: v.to(backbone.device) for k, v in batches[0].items() if k != "labels"}
    weights_bytes = parameter_bytes(backbone)
    mark_setup_done()

    use_bf16 = backbone.device.type == "cuda"  # as eval.train's "auto" mixed precision

    def forward():
        # The decoder stack with every layer's output kept: exactly what a QST step must compute
        # before its side network. Not the LM head: QST (training on labelled answer tokens)
        # projects only the labelled positions to the vocabulary, never all B x S of them.
        with torch.no_grad(), torch.autocast(backbone.device.type, dtype=torch.bfloat16, enabled=use_bf16):
            backbone.base_model(**inputs, output_hidden_states=True, use_cache=False)

    forward_time = median_step_time(forward, warmup=warmup, repeats=steps)
    return {"forward_time_s": forward_time, "parameter_bytes": weights_bytes}


# --------------------------------------------------------------------------- the whole bench

REPORT_NAME = "bench_tuning"
METHOD_KEYS = ("trainable_params", "trainable_share", "peak_memory_bytes", "step_time_s",
               "tokens_per_s", "compute_dtype", "train_time_s", "feature_cache", "final_loss", "accuracy", "accuracy_se",
               "examples_scored")
FIT_MARGIN = 0.9  # refuse a run whose estimate exceeds this share of the free memory


@dataclass(frozen=True)
class BenchSettings:
    """What `slimtune bench` runs; validated on construction (UserInputError)."""

    model: str | None = "ref-lm"
    arch: str | None = None
    methods: str | tuple[str, ...] = DEFAULT_METHODS
    batch: int = 16
    seq: int = 512
    steps: int = 5
    warmup: int = 2
    train_steps: int = 50
    task: str | dict | None = None  # a built-in name or a TaskSpec dict (eval.tasks.load_task)
    eval_examples: int | None = 200
    lr: float = 2e-4
    device: str = "cpu"
    dtype: str = "auto"
    seed: int = 0
    fit_check: bool = True
    train_examples: int | None = None  # None: the whole training split
    # QST / LST keep backbone features across epochs (their own advantage), attached after the
    # timed steps; random weights (arch) train only the timed steps, so never.
    feature_cache: bool = True
    # Set from `model` (a spec: 'pruned:DIR', or a directory a method package saved): the package
    # each fresh process imports so that eval.models.load_causal_lm opens that model type.
    model_package: str | None = None
    # QST's (and LST's) reduction factor r: side width = hidden / r. None: QSTConfig's default (the
    # paper's 16, a 256-wide side network on a 4096-wide 7B; on ref-lm's 128 it is 8 wide).
    qst_r: int | None = None
    # QST's side attention head dim (QSTConfig.side_head_dim); None: the backbone's head count.
    qst_head_dim: int | None = None
    # {method: lr} overriding `lr` for those methods (the --quick preset: each method at the rate
    # `bench --protocol` chose for it on validation).
    method_lrs: dict | None = None
    # The learning-rate schedule after a linear warm-up over `warmup_ratio` of the steps
    # (eval.train.SCHEDULES); the --quick preset trains as `bench --protocol` chose it: cosine.
    schedule: str = "constant"
    warmup_ratio: float = 0.03

    def __post_init__(self):
        from qst.baselines import check_methods

        object.__setattr__(self, "methods", tuple(check_methods(self.methods)))
        _check_sizes(self.batch, self.seq, self.steps, self.warmup, self.train_steps)
        if self.arch is not None:
            object.__setattr__(self, "model", None)  # random weights of a named architecture
            object.__setattr__(self, "feature_cache", False)
        elif self.model is None:
            raise UserInputError("give a model (pretrained: 'ref-lm', a directory, a hub id) or an arch (random weights)")
        else:
            from eval.model_specs import backbone_source

            model, package = backbone_source(self.model)
            object.__setattr__(self, "model", model)
            object.__setattr__(self, "model_package", package or self.model_package)
        if self.arch is not None and self.task is not None:
            raise UserInputError("--task needs a pretrained --model; --arch has random weights (memory and speed only)")
        for name in ("eval_examples", "train_examples", "qst_r", "qst_head_dim"):
            value = getattr(self, name)
            if value is not None:
                require_positive(name, value)
        if self.train_examples is not None and self.train_examples < self.batch:
            raise UserInputError(f"train_examples ({self.train_examples}) must be at least one batch ({self.batch})")
        require_positive_number("lr", self.lr)
        from eval.train import SCHEDULES

        if self.schedule not in SCHEDULES or not 0 <= self.warmup_ratio < 1:
            raise UserInputError(f"schedule must be one of {', '.join(SCHEDULES)} and warmup_ratio in [0, 1), got "
                                 f"{self.schedule!r} and {self.warmup_ratio!r}")
        if self.method_lrs is not None:
            object.__setattr__(self, "method_lrs", {m: require_positive_number(f"lr of {m}", v)
                                                    for m, v in dict(self.method_lrs).items()})
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise UserInputError(f"dtype must be auto, float32, bfloat16 or float16, got {self.dtype!r}")
        device = str(self.device)
        if not (device == "cpu" or device.startswith("cuda")):
            raise UserInputError(f"device must be 'cpu' or 'cuda[:N]', got {device!r}")
        from eval.models import resolve_device
        from qst.baselines import backbone_quantization

        # Before any process starts: CUDA itself, and bitsandbytes' CUDA library for 4-bit methods.
        resolve_device(device, four_bit=any(backbone_quantization(m) for m in self.methods))

    @property
    def compute_dtype(self) -> str:
        """The one dtype every method of the run computes in: `dtype`, or for "auto" the 4-bit
        compute dtype of the device (`eval.bnb.compute_dtype_name`: bf16 on CUDA and on CPUs with
        bf16 hardware, else fp32), so that 16-bit and 4-bit methods never mix precisions."""
        from eval.bnb import compute_dtype_name

        return compute_dtype_name(self.device) if self.dtype == "auto" else self.dtype

    def lr_of(self, method: str) -> float:
        return (self.method_lrs or {}).get(method, self.lr)

    def baseline_options(self) -> dict:
        """`qst.baselines.BaselineConfig` fields every method's process builds with."""
        options = {"r": self.qst_r, "side_head_dim": self.qst_head_dim}
        options = {k: v for k, v in options.items() if v is not None}
        return {"qst_options": options} if options else {}



def run_bench(settings: BenchSettings, out_dir, log=print,
              method_target: str = f"{__name__}:measure_method") -> dict[str, Any]:
    """Run the floor and every method in fresh processes; write the JSON, Markdown and PNG report.

    `method_target` is the `run_in_fresh_process` target measuring one method (tests swap it).
    """
    from eval.measure import machine_info, run_in_fresh_process
    from eval.report import write_report

    task = _resolve_task(settings)
    source = settings.arch or settings.model
    estimates = {m: _estimate(settings, m) for m in settings.methods}
    if settings.fit_check:
        _check_fits(settings, estimates)

    common = dict(model=settings.model, arch=settings.arch, task=task, batch=settings.batch, seq=settings.seq,
                  steps=settings.steps, warmup=settings.warmup, device=settings.device, seed=settings.seed,
                  dtype=settings.compute_dtype)
    total_steps = max(settings.train_steps, settings.warmup + settings.steps) if task else settings.warmup + settings.steps
    log(f"bench: {source}, task {task or '(random tokens)'}, batch {settings.batch}, seq {settings.seq}, "
        f"{len(settings.methods)} method(s), each in a fresh process")
    log("bench: [floor] no-grad forward of the 4-bit backbone")
    imports = (settings.model_package,) if settings.model_package else ()
    floor_raw = run_in_fresh_process(f"{__name__}:measure_forward_floor", common, imports=imports)
    floor = {
        "forward_time_s": floor_raw.get("forward_time_s"),
        "forward_peak_memory_bytes": _peak_bytes(floor_raw),
    }
    if floor_raw.get("error"):
        floor["error"] = floor_raw["error"]
        log(f"bench: [floor] failed: {floor_raw['error']}")

    methods, details = {}, {}
    for i, method in enumerate(settings.methods, 1):
        log(f"bench: [{i}/{len(settings.methods)}] {method}: build, {total_steps} training steps"
            + (", test accuracy" if task and settings.train_steps else ""))
        raw = run_in_fresh_process(
            method_target,
            {**common, "method": method, "train_steps": settings.train_steps, "lr": settings.lr_of(method),
             "eval_examples": settings.eval_examples,
             "train_examples": settings.train_examples, "feature_cache": settings.feature_cache,
             "schedule": settings.schedule, "warmup_ratio": settings.warmup_ratio,
             "baseline_options": settings.baseline_options()},
            imports=imports,
        )
        methods[method], details[method] = _method_entry(raw)
        if raw.get("error"):
            log(f"bench: [{i}/{len(settings.methods)}] {method} failed: {raw['error']}")
        else:
            estimates[method] = _estimate(settings, method, trainable_params=raw["trainable_params"],
                                          labelled_tokens=raw.get("labelled_tokens"))
            entry = methods[method]
            log(f"bench: [{i}/{len(settings.methods)}] {method}: peak {_mb(entry['peak_memory_bytes'])} MB "
                f"(estimate {_mb(estimates[method]['total_bytes'])} MB), step {entry['step_time_s']:.3f} s, "
                f"accuracy {_fmt(entry['accuracy'])}")

    data = {
        "model": source,
        "device": settings.device,
        "batch": settings.batch,
        "seq": settings.seq,
        "methods": methods,
        "floor": floor,
        "task": _task_label(task),
        "task_spec": task,
        **_base_rates(task, settings.eval_examples),
        "settings": {k: getattr(settings, k) for k in BenchSettings.__dataclass_fields__},
        "estimates": {m: {"total_bytes": e["total_bytes"], "breakdown_bytes": e["breakdown_bytes"]}
                      for m, e in estimates.items()},
        "details": details,
        "machine": machine_info(),
    }
    markdown = format_markdown(data)
    paths = write_report(out_dir, REPORT_NAME, data, markdown, plots={REPORT_NAME: _plot(data)},
                         figsize=(10, 4))
    return {"data": data, "markdown": markdown, "paths": paths}


def _resolve_task(settings: BenchSettings) -> str | dict | None:
    if settings.arch is not None:
        return None
    from eval.tasks import TASKS, load_task

    name = settings.task or TASKS[0]
    load_task(name)  # an unknown task or bad data fails here, before any process starts
    return name


def _task_label(task: str | dict | None) -> str | None:
    """The task's name in the report: a built-in name, or the user's data source."""
    if isinstance(task, dict):
        return task["source"] + (f" ({task['config']})" if task.get("config") else "")
    return task


def _base_rates(task: str | dict | None, eval_examples: int | None) -> dict[str, float | None]:
    """The accuracy of always answering the most frequent right answer, and of guessing, on the
    test examples the bench scores (the first `eval_examples`): what "learned something" is against."""
    if task is None:
        return {"majority_rate": None, "chance_rate": None}
    from collections import Counter

    from eval.tasks import load_task

    loaded = load_task(task)
    if loaded.kind == "instruction":  # scored by perplexity: no answers to count
        return {"majority_rate": None, "chance_rate": None}
    examples = loaded.test[:eval_examples] if eval_examples is not None else loaded.test
    targets = Counter(loaded.target(e) for e in examples)
    chance = sum(1 / len(loaded.candidates(e)) for e in examples) / len(examples)
    return {"majority_rate": max(targets.values()) / len(examples), "chance_rate": chance}


def _estimate(settings: BenchSettings, method: str, trainable_params: int | None = None,
              labelled_tokens: int | None = None) -> dict:
    """Before the run (fit check): logits at every position, an upper bound; after it: at the
    labelled positions of the batch with the most, where every method's LM head ran."""
    from eval.memory_estimate import estimate_memory

    return estimate_memory(
        settings.arch or settings.model, method, batch=settings.batch, seq=settings.seq,
        dtype=settings.compute_dtype, trainable_params=trainable_params, device=settings.device,
        labelled_tokens=labelled_tokens, qst_reduction=settings.qst_r or QST_REDUCTION,
    )


def _check_fits(settings: BenchSettings, estimates: dict[str, dict]) -> None:
    from eval.measure import available_memory_bytes

    available = available_memory_bytes(str(settings.device))
    if available is None:
        return
    too_big = {m: e for m, e in estimates.items() if e["total_bytes"] > FIT_MARGIN * available}
    if too_big:
        worst = ", ".join(f"{m} ~{e['total_bytes'] / 1e9:.2f} GB ({_breakdown(e)})" for m, e in too_big.items())
        raise UserInputError(
            f"batch {settings.batch} x seq {settings.seq} will not fit on {settings.device}: the memory estimate "
            f"is {worst}, but only {available / 1e9:.2f} GB is free; use a smaller --batch or --seq, fewer "
            "--methods, or --no-fit-check to try anyway"
        )


def _breakdown(estimate: dict) -> str:
    return ", ".join(f"{k} {v:.2f}" for k, v in estimate["breakdown_gb"].items() if v)


def _peak_bytes(raw: dict) -> int | None:
    """Weights + training state: CUDA's max_memory_allocated already holds the weights; on CPU the
    worker measured peak RSS minus RSS at set-up (weights already resident), so add them back."""
    peak = raw.get("peak_memory_bytes")
    if peak is None:
        return None
    if "cuda_max_memory_allocated_bytes" in raw or raw.get("memory_measure") == "torch.cuda.max_memory_allocated":
        return int(peak)
    return int(peak + raw.get("parameter_bytes", 0))


def _method_entry(raw: dict) -> tuple[dict, dict]:
    if raw.get("error"):
        entry = dict.fromkeys(METHOD_KEYS)
        entry["error"] = raw["error"]
        return entry, {"traceback": raw.get("traceback", "")}
    entry = {k: raw.get(k) for k in METHOD_KEYS}
    entry["peak_memory_bytes"] = _peak_bytes(raw)
    # An instruction task is scored by held-out loss and perplexity of its responses, not accuracy.
    entry.update({k: raw[k] for k in ("heldout_loss", "perplexity") if raw.get(k) is not None})
    details = {k: raw.get(k) for k in ("total_params", "parameter_bytes", "steps_trained", "losses",
                                       "memory_measure", "labelled_tokens")}
    details["peak_increment_bytes"] = raw.get("peak_memory_bytes")
    return entry, details


# --------------------------------------------------------------------------- the report


def _ratio(a, b):
    return a / b if isinstance(a, (int, float)) and isinstance(b, (int, float)) and b else None


def _mb(n):
    return None if n is None else round(n / 1e6, 1)


def _fmt(x, spec=".3f"):
    return "—" if x is None else format(x, spec)


def _percent_with_se(accuracy, se) -> str | None:
    if accuracy is None:
        return None
    return f"{100 * accuracy:.1f} ± {100 * se:.1f}" if se is not None else f"{100 * accuracy:.1f}"


def _scored(methods: dict) -> str:
    counts = sorted({m.get("examples_scored") for m in methods.values() if m.get("examples_scored")})
    return " / ".join(map(str, counts)) or "no"


def format_markdown(data: dict) -> str:
    """The table people read: each method's numbers and its ratios against QLoRA and the floor."""
    from eval.measure import machine_line
    from eval.report import markdown_table

    methods, floor = data["methods"], data["floor"]
    ref = methods.get("qlora") if not (methods.get("qlora") or {}).get("error") else None
    rows = []
    for name, m in methods.items():
        if m.get("error"):
            rows.append({"method": name, "error": m["error"]})
            continue
        estimate = data["estimates"][name]["total_bytes"]
        acc = m["accuracy"]
        ref_acc = ref["accuracy"] if ref else None
        cache = m.get("feature_cache")
        rows.append({
            "method": name,
            "trainable": m["trainable_params"],
            "share %": 100 * m["trainable_share"],
            "peak MB": _mb(m["peak_memory_bytes"]),
            "estimate MB": _mb(estimate),
            "mem / QLoRA": _ratio(m["peak_memory_bytes"], ref and ref["peak_memory_bytes"]),
            "step s": m["step_time_s"],
            "step / QLoRA": _ratio(m["step_time_s"], ref and ref["step_time_s"]),
            "step / floor": _ratio(m["step_time_s"], floor.get("forward_time_s")),
            "tokens/s": round(m["tokens_per_s"]),
            "compute": m.get("compute_dtype"),
            "cached step s": cache.get("cached_step_s") if cache else None,
            "cached / uncached": cache.get("cached_over_uncached") if cache else None,
            "train s": m.get("train_time_s"),
            "train / QLoRA": _ratio(m.get("train_time_s"), ref and ref.get("train_time_s")),
            "final loss": m["final_loss"],
            "accuracy %": _percent_with_se(acc, m.get("accuracy_se")),
            "Δacc vs QLoRA (pts)": None if acc is None or ref_acc is None else 100 * (acc - ref_acc),
            "held-out ppl": m.get("perplexity"),
            "error": None,
        })
    columns = list(dict.fromkeys(k for r in rows for k in r))
    if "held-out ppl" in columns and all(r.get("held-out ppl") is None for r in rows):
        columns.remove("held-out ppl")  # only instruction tasks are scored by it
    if all(r.get("error") is None for r in rows):
        columns.remove("error")
    s = data["settings"]
    lines = [
        "# Tuning benchmark",
        "",
        f"Model `{data['model']}` on `{data['device']}`, task `{data['task'] or 'random tokens'}`, batch "
        f"{data['batch']}, seq {data['seq']}, AdamW lr {_lrs(s)} ({s.get('schedule', 'constant')} after "
        f"{100 * s.get('warmup_ratio', 0.03):g} % warm-up), {s['warmup']} warm-up + {s['steps']} timed "
        f"steps" + (f", accuracy after {max(s['train_steps'], s['warmup'] + s['steps'])} training steps"
                   if data["task"] else " (random weights: no accuracy)")
        + (f", training on {s['train_examples']} examples" if s.get("train_examples") else "")
        + f", QST r {s.get('qst_r') or QST_REDUCTION} (side width = hidden / r).",
        "",
        markdown_table(rows, columns, floatfmt=".4g"),
        *([f"Accuracy ± its standard error on {_scored(methods)} test examples; the majority class of "
           f"those examples is {100 * data['majority_rate']:.1f} %, chance {100 * data['chance_rate']:.1f} %.", ""]
          if data.get("majority_rate") is not None else []),
        "Train s = the whole training run (every step, warm-up included). Step s is timed without the "
        "feature cache: QST and LST attach it only after the timed steps (hits and writes during them: "
        + _timed_cache_counts(methods) + "). Cached step s = the median step that read its backbone "
        "features from the cache instead of running the backbone (epochs >= 2): the cache's own benefit, "
        "against step s without it. Compute = the dtype the bulk of every method's Linear arithmetic "
        f"ran in (one per run: {s.get('dtype')} requested).",
        "",
        f"Floor (no-grad forward of the 4-bit backbone's decoder, hidden states kept, no LM head, no KV cache): "
        f"{_fmt(floor.get('forward_time_s'))} s, "
        f"{_fmt(_mb(floor.get('forward_peak_memory_bytes')), '.1f')} MB"
        + (f" — failed: {floor['error']}" if floor.get("error") else "") + ".",
        "",
        "Peak memory = weights + training state, during training only (scoring afterwards not counted; "
        "CUDA: max_memory_allocated; CPU: peak RSS during training minus RSS at its start, plus the "
        "parameters' bytes). Estimate = `slimtune estimate-memory` (detailed "
        "assumptions) with the measured trainable count. Ratios < 1 mean less than QLoRA.",
        "",
        "Every method computes the LM head, the logits and the loss only at the positions that predict "
        "a labelled token (the same mean cross-entropy as ignoring label -100 everywhere).",
        "",
        machine_line(data["machine"]) if data.get("machine") else "Machine: not recorded.",
    ]
    return "\n".join(lines) + "\n"


def _lrs(settings: dict) -> str:
    per_method = settings.get("method_lrs")
    if not per_method:
        return f"{settings['lr']} for every method"
    return ", ".join(f"{m} {lr:g}" for m, lr in per_method.items()) + f" (others {settings['lr']})"


def _timed_cache_counts(methods: dict) -> str:
    counts = [f"{name} {c['timed_hits']} / {c['timed_writes']}" for name, m in methods.items()
              if (c := m.get("feature_cache"))]
    return ", ".join(counts) or "no method cached"


def _plot(data: dict):
    names = [n for n, m in data["methods"].items() if not m.get("error")]
    memory = [data["methods"][n]["peak_memory_bytes"] / 1e6 for n in names]
    times = [data["methods"][n]["step_time_s"] for n in names]
    floor = data["floor"]

    def draw(ax):
        fig = ax.figure
        ax.remove()
        left, right = fig.subplots(1, 2)
        for axis, values, label, floor_value in (
            (left, memory, "peak memory (MB)", _mb(floor.get("forward_peak_memory_bytes"))),
            (right, times, "median step time (s)", floor.get("forward_time_s")),
        ):
            bars = axis.bar(range(len(names)), values, color="#4C72B0")
            axis.set_xticks(range(len(names)), names, rotation=20)
            axis.set_ylabel(label)
            axis.bar_label(bars, labels=[f"{v:.3g}" for v in values], fontsize=8, padding=2)
            if floor_value is not None:
                axis.axhline(floor_value, color="#C44E52", linestyle="--", label="4-bit forward floor")
                axis.legend(fontsize=8)
            axis.grid(axis="y", alpha=0.3)
        fig.suptitle(f"{data['model']}, batch {data['batch']}, seq {data['seq']}, {data['device']}")

    return draw


# --------------------------------------------------------------------------- how cost grows with size

SCALING_NAME = "bench_scaling_tuning"
SCALING_METHODS = ("qst", "qlora", "qlora-gc", "lora")


def _key(method: str) -> str:
    return method.replace("-", "_")  # qlora-gc -> qlora_gc in row keys


def run_scaling(archs: tuple[str, ...], out_dir, batch: int = 4, seq: int = 256, steps: int = 2,
                warmup: int = 1, device: str = "cpu", seed: int = 0, log=print, qst_r: int | None = None,
                qst_head_dim: int | None = None, methods=SCALING_METHODS) -> dict[str, Any]:
    """`run_bench` on random-weight models of growing size (smallest first): peak memory and step
    time of QST, QLoRA (with and without gradient checkpointing) and LoRA and the 4-bit forward
    floor, and the ratios QST / QLoRA and QST / floor against parameter count. One sub-report per
    size under `out_dir/<arch>/`. No feature cache anywhere (random weights train only the timed
    steps); `qst_head_dim` gives QST's side attention fewer, wider heads; `methods`: a subset of
    SCALING_METHODS (the floor is always measured)."""
    from pathlib import Path

    from eval.measure import machine_info
    from eval.models import param_count_of_arch
    from eval.report import write_report

    archs = check_scaling_archs(archs)
    methods = check_scaling_methods(methods)
    rows = []
    for i, arch in enumerate(archs, 1):
        log(f"bench --scaling: [{i}/{len(archs)}] {arch} ({param_count_of_arch(arch) / 1e6:.1f} M parameters)")
        settings = BenchSettings(model=None, arch=arch, methods=methods, batch=batch, seq=seq,
                                 steps=steps, warmup=warmup, train_steps=0, device=device, seed=seed,
                                 feature_cache=False, qst_r=qst_r, qst_head_dim=qst_head_dim)
        report = run_bench(settings, Path(out_dir) / arch, log=log)
        rows.append(_scaling_row(arch, param_count_of_arch(arch), report["data"]))
    data = {"batch": batch, "seq": seq, "steps": steps, "warmup": warmup, "device": device,
            "qst_r": qst_r, "qst_head_dim": qst_head_dim, "feature_cache": False,
            "archs": list(archs), "rows": rows, "machine": machine_info()}
    markdown = format_scaling_markdown(data)
    paths = write_report(out_dir, SCALING_NAME, data, markdown, plots={SCALING_NAME: _plot_scaling(data)},
                         figsize=(10, 4))
    return {"data": data, "markdown": markdown, "paths": paths}


def check_scaling_methods(methods) -> tuple[str, ...]:
    from qst.baselines import check_methods

    methods = tuple(check_methods(methods))
    outside = [m for m in methods if m not in SCALING_METHODS]
    if outside:
        raise UserInputError(f"--scaling measures {', '.join(SCALING_METHODS)}; got {', '.join(outside)}")
    return methods


def check_scaling_archs(archs) -> tuple[str, ...]:
    from eval.models import param_count_of_arch

    archs = tuple(a.strip() for a in (archs.split(",") if isinstance(archs, str) else archs) if a.strip())
    if not archs:
        raise UserInputError("the scaling size list is empty; give architecture names, smallest first")
    sizes = [param_count_of_arch(a) for a in archs]  # an unknown name fails here, before any process
    if any(b <= a for a, b in zip(sizes, sizes[1:])):
        listed = ", ".join(f"{a} ({n / 1e6:.1f} M)" for a, n in zip(archs, sizes))
        raise UserInputError(f"the scaling sizes must grow strictly, smallest first; got {listed}")
    return archs


def _scaling_row(arch: str, params: int, data: dict) -> dict[str, Any]:
    methods, floor = data["methods"], data["floor"]

    def get(method, key):
        entry = methods.get(method) or {}
        return None if entry.get("error") else entry.get(key)

    row = {"arch": arch, "params": params, "floor_time_s": floor.get("forward_time_s"),
           "floor_peak_memory_bytes": floor.get("forward_peak_memory_bytes")}
    for method in SCALING_METHODS:
        row[f"{_key(method)}_peak_memory_bytes"] = get(method, "peak_memory_bytes")
        row[f"{_key(method)}_step_time_s"] = get(method, "step_time_s")
        if (methods.get(method) or {}).get("error"):
            row[f"{_key(method)}_error"] = methods[method]["error"]
    row["qst_over_qlora_memory"] = _ratio(row["qst_peak_memory_bytes"], row["qlora_peak_memory_bytes"])
    row["qst_over_qlora_gc_memory"] = _ratio(row["qst_peak_memory_bytes"], row["qlora_gc_peak_memory_bytes"])
    row["qst_over_qlora_step"] = _ratio(row["qst_step_time_s"], row["qlora_step_time_s"])
    row["qst_over_floor_step"] = _ratio(row["qst_step_time_s"], row["floor_time_s"])
    return row


def format_scaling_markdown(data: dict) -> str:
    from eval.measure import machine_line
    from eval.report import markdown_table

    rows = [{
        "arch": r["arch"], "params M": r["params"] / 1e6,
        "floor s": r["floor_time_s"], "QST s": r["qst_step_time_s"], "QLoRA s": r["qlora_step_time_s"],
        "QLoRA-gc s": r.get("qlora_gc_step_time_s"), "LoRA s": r["lora_step_time_s"],
        "QST MB": _mb(r["qst_peak_memory_bytes"]), "QLoRA MB": _mb(r["qlora_peak_memory_bytes"]),
        "QLoRA-gc MB": _mb(r.get("qlora_gc_peak_memory_bytes")), "LoRA MB": _mb(r["lora_peak_memory_bytes"]),
        "mem QST/QLoRA": r["qst_over_qlora_memory"], "mem QST/QLoRA-gc": r.get("qst_over_qlora_gc_memory"),
        "step QST/QLoRA": r["qst_over_qlora_step"],
        "step QST/floor": r["qst_over_floor_step"],
    } for r in data["rows"]]
    errors = [f"- {r['arch']} {m}: {r[f'{_key(m)}_error']}" for r in data["rows"] for m in SCALING_METHODS
              if r.get(f"{_key(m)}_error")]
    lines = [
        "# How tuning cost grows with model size",
        "",
        f"LLaMA-shaped models with random weights on `{data['device']}`, batch {data['batch']}, seq {data['seq']}, "
        f"median of {data['steps']} timed steps after {data['warmup']} warm-up; each method and the floor in a "
        "fresh process (per-size details in the sub-directories); no feature cache"
        + (f"; QST r {data['qst_r']}" if data.get("qst_r") else "")
        + (f"; QST side head dim {data['qst_head_dim']}" if data.get("qst_head_dim") else "") + ".",
        "",
        markdown_table(rows, list(rows[0]), floatfmt=".4g"),
        *(["Failed:", *errors, ""] if errors else []),
        "Floor: a no-grad forward of the 4-bit backbone's decoder (what a QST step must run first). Peak memory "
        "is weights + training state (see bench_tuning.md of each size).",
        "",
        machine_line(data["machine"]),
    ]
    return "\n".join(lines) + "\n"


def _plot_scaling(data: dict):
    rows = data["rows"]
    params = [r["params"] / 1e6 for r in rows]

    def draw(ax):
        fig = ax.figure
        ax.remove()
        left, right = fig.subplots(1, 2)
        for axis, keys, title in (
            (left, ("qst_over_qlora_memory", "qst_over_qlora_step"), "QST / QLoRA"),
            (right, ("qst_over_floor_step",), "QST step / 4-bit forward floor"),
        ):
            for key in keys:
                points = [(p, r[key]) for p, r in zip(params, rows) if r[key] is not None]
                if points:
                    axis.plot(*zip(*points), marker="o", label=key.split("_")[-1])
            axis.set_xscale("log")
            axis.set_xlabel("parameters (M)")
            axis.set_title(title)
            axis.grid(alpha=0.3)
            axis.legend(fontsize=8)
        left.axhline(1 / 3, color="#C44E52", linestyle="--", linewidth=1)
        fig.suptitle(f"batch {data['batch']}, seq {data['seq']}, {data['device']}")

    return draw
