"""Training curves of a 03_grpo_search.py run (its metrics.jsonl) as one PNG: reward with F1 and the
format-valid rate, searches per rollout, the share of groups whose rewards are all equal (no gradient),
KL to the reference and entropy, response length, and the time split of a step.

    python extras/plot_curves.py runs/grpo      # writes runs/grpo/training_curves.png, prints the trend
"""

import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import utils  # noqa: E402


def step_line(metrics: dict, max_steps: int) -> str:
    """03_grpo_search.py's one line per step."""
    def show(key: str, fmt: str = "{:.2f}") -> str:
        value = metrics.get(key)
        if isinstance(value, (int, float)):
            return fmt.format(value)
        return "-"
    return (f"step {metrics['step']}/{max_steps} | reward {show('reward')} ± {show('reward_std')} | "
            f"F1 {show('search/f1')} | format {show('search/format_ok')} | "
            f"searches {show('search/searches_per_rollout')} | equal-reward groups {show('frac_reward_zero_std')} | "
            f"KL {show('kl', '{:.4f}')} | tokens {show('search/response_length', '{:.0f}')} | "
            f"s: generate {show('time/generate_s', '{:.0f}')} train {show('time/train_s', '{:.0f}')}")


def plot_run(run_dir: str) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise utils.ReSearchError(f"{run_dir}: no metrics.jsonl there (is it a 03_grpo_search.py output_dir?)")
    rows = {r["step"]: r for r in utils.read_jsonl(path) if "reward" in r}  # the last row of each step
    if not rows:
        raise utils.ReSearchError(f"{path}: no training steps logged yet")
    rows = [rows[k] for k in sorted(rows)]
    cfg_path = Path(run_dir) / "run_config.json"
    cfg = json.loads(cfg_path.read_text()) if cfg_path.is_file() else {}
    x = [r["step"] for r in rows]

    def col(key):
        return [r.get(key, float("nan")) for r in rows]

    fig, ax = plt.subplots(2, 3, figsize=(16, 8))
    mean, std = col("reward"), col("reward_std")
    ax[0, 0].plot(x, mean, "o-", label="reward (mean)")
    ax[0, 0].fill_between(x, [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)], alpha=0.2,
                          label="± std over rollouts")
    ax[0, 0].plot(x, col("search/f1"), "s--", label="answer F1")
    ax[0, 0].plot(x, col("search/format_ok"), "^:", label="format valid + EOS")
    ax[0, 0].set_title("Reward")
    ax[0, 1].plot(x, col("search/searches_per_rollout"), "o-", label="searches per rollout")
    ax[0, 1].plot(x, col("frac_reward_zero_std"), "s--", label="groups with equal rewards (no gradient)")
    ax[0, 1].set_title("Searches; informative groups")
    ax[0, 2].plot(x, col("kl"), "o-", label="KL to the reference (k3)")
    ax[0, 2].set_title("KL")
    ax2 = ax[0, 2].twinx()
    ax2.plot(x, col("entropy"), "s--", color="tab:orange", label="entropy (model tokens)")
    ax2.legend(fontsize=8, loc="lower right")
    ax[1, 0].plot(x, col("completions/mean_length"), "o-", label="model tokens")
    ax[1, 0].plot(x, col("search/response_length"), "s--", label="model + retrieved tokens")
    ax[1, 0].set_title("Response length (tokens)")
    ax[1, 1].stackplot(x, col("time/generate_s"), col("time/retrieve_s"), col("time/train_s"),
                       labels=["generate", "retrieve", "train"])
    ax[1, 1].set_title("Time per step (s)")
    ax[1, 2].plot(x, col("learning_rate"), "o-", label="learning rate")
    ax[1, 2].set_title("Learning rate")
    for a in ax.flat:
        a.xaxis.set_major_locator(MaxNLocator(integer=True))
        a.set_xlabel("step")
        a.grid(alpha=0.3)
        if a.get_legend_handles_labels()[0]:
            a.legend(fontsize=8, loc="upper left")
    s = cfg.get("search", {})
    fig.suptitle(f"{Path(run_dir).name}: model {cfg.get('model', '?')} | data {cfg.get('train_data', '?')} | "
                 f"retriever {cfg.get('retriever', '?')} | top-k {s.get('topk', '?')}", fontsize=9)
    fig.tight_layout()
    out = Path(run_dir) / "training_curves.png"
    tmp = out.with_name("training_curves.tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, out)
    return out


def trend(run_dir: str) -> str:
    """Per step: mean reward, F1 and format-valid rate, one line each."""
    rows = {r["step"]: r for r in utils.read_jsonl(Path(run_dir) / "metrics.jsonl") if "reward" in r}
    line = lambda key: " ".join(f"{rows[k].get(key, float('nan')):.2f}" for k in sorted(rows))  # noqa: E731
    return (f"reward per step:       {line('reward')}\nF1 per step:           {line('search/f1')}\n"
            f"format-valid per step: {line('search/format_ok')}")


def main():
    run_dir = sys.argv[1] if len(sys.argv) > 1 else "runs/grpo"
    out = plot_run(run_dir)
    print(trend(run_dir))
    print(f"curves: {out}")


if __name__ == "__main__":
    utils.run_main(main)
