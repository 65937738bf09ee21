"""The training loop: state restore-or-init, steps, late metrics, eval, checkpoints, report."""

from __future__ import annotations

import math
import os
import time
from typing import Any

import jax
import numpy as np
from flax import nnx
from tqdm import tqdm

from deepseek_jax.config import ModelConfig
from deepseek_jax.pipeline.placement import pipeline_for
from deepseek_jax.sharding import data_parallel_size
from deepseek_jax.train.checkpoint import (
    Checkpointer,
    check_resumable,
    resume_differences,
    run_meta,
)
from deepseek_jax.train.config import TrainConfig
from deepseek_jax.train.metrics import MetricsLogger, plot_run
from deepseek_jax.train.state import abstract_state, init_state, plan
from deepseek_jax.train.step import batch_sharding, global_batch, jit_eval_step, jit_train_step


class TrainingDiverged(RuntimeError):  # noqa: N818 - the name the issue and runner use
    """The loss became NaN or inf: training stopped; the message names the last good
    checkpoint."""


class Trainer:
    """Restore-or-init, steps, evaluation, checkpoints. Raises domain errors, never exits:
    ``ValueError`` (a corpus that does not fit the model), ``CheckpointError`` and
    ``TrainingDiverged``; ``runner.run`` maps them to exit codes."""

    def __init__(
        self,
        cfg: ModelConfig,
        tcfg: TrainConfig,
        mesh: jax.sharding.Mesh,
        corpus,
        *,
        out_dir: str,
        progress: bool = True,
        on_record=None,
        allow_config_change: bool = False,
    ):
        """on_record: called with each train and eval record as it is logged (live plots)."""
        self.cfg, self.tcfg, self.mesh, self.corpus = cfg, tcfg, mesh, corpus
        self.out_dir = out_dir
        self.on_record = on_record
        self.lead = jax.process_index() == 0
        self.progress = progress and self.lead
        corpus.check_vocab(cfg.vocab_size)
        os.makedirs(out_dir, exist_ok=True)
        self.allow_config_change = allow_config_change
        self.meta = run_meta(cfg, tcfg, data=corpus.cache_path.name)
        self.ckpt = Checkpointer(os.path.join(out_dir, "checkpoints"), keep=tcfg.keep)
        self.graphdef, self.state, self.layout, tx = self._restore_or_init()
        pipe = pipeline_for(cfg, tcfg, mesh)
        self.train_step = jit_train_step(self.graphdef, tx, tcfg, self.layout, mesh, pipe)
        self.eval_step = jit_eval_step(self.graphdef, tcfg, self.layout, mesh)
        self.batch_sharding = batch_sharding(mesh)
        self.log = MetricsLogger(out_dir, enabled=self.lead)
        self.log.write(
            {
                "kind": "run",
                "step": int(jax.device_get(self.state.step)),
                "num_moe_layers": cfg.num_moe_layers,
                "unigram_entropy": corpus.unigram_entropy(),
            }
        )
        self.history: list[dict[str, Any]] = []

    def _restore_or_init(self):
        latest = self.ckpt.latest_step()
        if latest is None:
            return init_state(self.cfg, self.tcfg, self.mesh)
        graphdef, abs_state, layout, tx = plan(self.cfg, self.tcfg, self.mesh)
        with jax.set_mesh(self.mesh):
            state = self.ckpt.restore(latest, abstract_state(abs_state, layout), self._check)
        if self.lead:
            print(f"resumed from {self.ckpt.directory}/{latest}")
        return graphdef, state, layout, tx

    def _check(self, saved: dict[str, Any]) -> None:
        """Refuses a checkpoint this run cannot resume exactly; with ``allow_config_change``
        lists the differences instead."""
        where = os.path.join(self.ckpt.directory, str(self.ckpt.latest_step()))
        if not self.allow_config_change:
            check_resumable(saved, self.meta, self.ckpt.latest_step(), where)
        elif self.lead:
            for d in resume_differences(saved, self.meta, self.ckpt.latest_step()):
                print(f"warning: resuming {where} with a changed {d} (--allow-config-change)")

    # ------------------------------------------------------------------ steps
    def _eval(self, step: int) -> dict[str, float]:
        t = self.tcfg
        n = min(t.eval_batches, self.corpus.num_eval_batches(t.batch_size, t.seq_len))
        if n == 0:
            return {}
        sums: dict[str, float] = {}
        batches = self.corpus.eval_batches(
            t.batch_size,
            t.seq_len,
            max_batches=n,
            process_index=jax.process_index(),
            process_count=jax.process_count(),
        )
        for rows in batches:
            ids = global_batch(rows, self.batch_sharding, t.batch_size, t.seq_len)
            for k, v in jax.device_get(self.eval_step(self.state, ids)).items():
                sums[k] = sums.get(k, 0.0) + float(v) / n
        rec = {"kind": "eval", "step": step, **sums}
        self.log.write(rec)
        self.history.append(rec)
        if self.on_record is not None:
            self.on_record(rec)
        return sums

    def _record(self, step: int, metrics, bar) -> dict[str, Any]:
        """Fetches step ``step``'s metrics (waiting for it); throughput since the last record."""
        m = jax.device_get(metrics)
        now = time.perf_counter()
        done = step + 1 - self._clock[0]
        tokens = self.tcfg.batch_size * self.tcfg.seq_len * done
        rec = {
            "kind": "train",
            "step": step,
            **{k: np.asarray(v).tolist() for k, v in m.items()},
            "tokens_per_s": tokens / max(now - self._clock[1], 1e-9),
        }
        self._clock = (step + 1, now)
        if not math.isfinite(rec["loss"]):
            self.ckpt.close()  # let in-flight saves of good states commit
            last = self.ckpt.latest_step()
            raise TrainingDiverged(
                f"loss is {rec['loss']} at step {step}: training stopped; the last "
                f"good checkpoint is step {last} in {self.ckpt.directory}"
            )
        self.log.write(rec)
        self.history.append(rec)
        if self.on_record is not None:
            self.on_record(rec)
        if bar is not None:
            bar.set_postfix(
                loss=f"{rec['loss']:.3f}",
                tok_s=f"{rec['tokens_per_s']:.0f}",
                balance=f"{rec.get('balance', 1.0):.2f}",
            )
        return rec

    def _save(self, step: int) -> None:
        self.ckpt.save(step, self.state, self.meta)

    def fit(self, stop) -> dict[str, Any]:
        """Runs to ``tcfg.steps`` (or a stop request); metrics are read one step late."""
        t = self.tcfg
        start = int(jax.device_get(self.state.step))
        self._clock = (start, time.perf_counter())
        bar = (
            tqdm(
                total=t.steps,
                initial=start,
                disable=not self.progress,
                unit="step",
                dynamic_ncols=True,
            )
            if self.progress
            else None
        )
        pending, saved = None, start
        for step in range(start, t.steps):
            rows = self.corpus.process_batch(
                t.seed, step, t.batch_size, t.seq_len, jax.process_index(), jax.process_count()
            )
            ids = global_batch(rows, self.batch_sharding, t.batch_size, t.seq_len)
            self.state, metrics = self.train_step(self.state, ids)
            if pending is not None:
                self._record(*pending, bar)
            if bar is not None:
                bar.update(1)
            done = step + 1
            if stop.requested or done % t.ckpt_every == 0 or done % t.eval_every == 0:
                self._record(step, metrics, bar)  # sync before saving or evaluating
                pending = None
                if done % t.eval_every == 0:
                    self._eval(done)
                if done % t.ckpt_every == 0 or stop.requested:
                    self._save(done)
                    saved = done
                self._clock = (done, time.perf_counter())  # eval/save time is not training
                if stop.requested:
                    break
            else:
                pending = (step, metrics)
        if pending is not None:
            self._record(*pending, bar)
        end = int(jax.device_get(self.state.step))
        if end != saved:
            self._save(end)
        self.ckpt.wait()
        if bar is not None:
            bar.close()
        return {"start_step": start, "end_step": end, "interrupted": bool(stop.requested)}

    # ------------------------------------------------------------------ report
    def report(self, summary: dict[str, Any], *, sample_tokens: int = 64) -> None:
        """Final evaluation, the learned-or-not summary, the plot and a generated sample."""
        end = summary["end_step"]
        evals = [r for r in self.history if r["kind"] == "eval" and r["step"] == end]
        ev = evals[-1] if evals else (self._eval(end) if end > 0 else {})
        train = [r for r in self.history if r["kind"] == "train"]
        summary.update(unigram_entropy=self.corpus.unigram_entropy(), eval_ce=ev.get("ce"))
        if train:
            summary.update(
                first_loss=train[0]["ce"],
                last_loss=train[-1]["ce"],
                first_balance=train[0].get("balance"),
                last_balance=train[-1].get("balance"),
            )
            if "balance" in train[0]:  # one step is noisy: also the first and last tenth
                n = max(1, len(train) // 10)
                mean = lambda rs: float(np.mean([r["balance"] for r in rs]))  # noqa: E731
                summary.update(
                    first_tenth_balance=mean(train[:n]), last_tenth_balance=mean(train[-n:])
                )
        self.log.write(
            {
                "kind": "summary",
                "step": end,
                **{k: v for k, v in summary.items() if isinstance(v, (int, float))},
            }
        )
        self.log.close()
        self.ckpt.close()
        if not self.lead:
            return
        self._print_summary(summary)
        metrics = os.path.join(self.out_dir, "metrics.jsonl")
        if os.path.exists(metrics):
            plot_run(metrics, os.path.join(self.out_dir, "training.png"))
            print(f"plot: {os.path.join(self.out_dir, 'training.png')}")
        if sample_tokens > 0 and not summary["interrupted"]:
            self._sample(sample_tokens)

    def _print_summary(self, s: dict[str, Any]) -> None:
        f = lambda v: "n/a" if v is None else f"{v:.3f}"  # noqa: E731
        print(
            f"steps {s['start_step']} -> {s['end_step']}"
            + (" (interrupted; checkpoint saved)" if s["interrupted"] else "")
        )
        print(
            f"train loss (CE, nats/token): first {f(s.get('first_loss'))}, "
            f"last {f(s.get('last_loss'))}"
        )
        print(
            f"held-out loss: {f(s.get('eval_ce'))}   unigram-entropy baseline: "
            f"{f(s['unigram_entropy'])}"
        )
        if s.get("first_balance") is not None:
            print(
                f"expert load max/mean (mean over MoE layers): first "
                f"{f(s['first_balance'])}, last {f(s['last_balance'])}; mean over the first "
                f"tenth of the steps {f(s['first_tenth_balance'])}, last tenth "
                f"{f(s['last_tenth_balance'])}"
            )

    def _sample(self, n: int) -> None:
        from deepseek_jax.infer.generate import generate

        model = nnx.merge(self.graphdef, self.state.params, self.state.rest)
        prompt = "def "
        rows = data_parallel_size(self.mesh)  # one row per data-parallel shard
        ids = np.asarray([self.corpus.tokenizer.encode(prompt)] * rows, np.int32)
        with jax.set_mesh(self.mesh):
            ids = jax.device_put(ids, self.batch_sharding)
            out = generate(model, ids, n, temperature=0.8, top_k=40, seed=self.tcfg.seed)
        text = prompt + self.corpus.tokenizer.decode(np.asarray(out[0]).tolist())
        path = os.path.join(self.out_dir, "sample.txt")
        with open(path, "w") as fh:
            fh.write(text)
        print(f"sample ({n} tokens, MLA latent-cache decode) -> {path}:\n{text}")
