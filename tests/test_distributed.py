"""Several processes for real, on CPU: the causal-LM recipe under ``accelerate launch`` with 2 processes (DDP over
gloo) against 1 process, and a patched model sharded with FSDP2 (``fully_shard``) under torchrun.

Why the 2-process and 1-process runs must agree: both see the same global batch of 4 blocks per step (2 per process
x 2 processes vs 4 x 1; sequential sampler, ``dataloader_drop_last``), the same seed and no dropout. The Trainer
normalises the loss by the number of label tokens in the *global* batch, so the all-reduced gradient equals the
1-process gradient up to float32 summation order (~1e-7 relative); over 4 Adam steps the logged losses then agree
to ~1e-6 relative, and we allow 1e-5.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from test_recipes import TINY_GPT2, recipe, synthetic_lines

from hf_sparse_attn.training.data import word_level_tokenizer

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    """A TCP port that nothing listens on right now (so parallel or repeated runs never share a rendezvous port)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run(command: list[str], cwd: Path, timeout: int = 900) -> None:
    """Run a launcher and its worker processes in their own process group, killed as a whole on timeout (killing
    only the launcher would leave the workers waiting on each other). The timeout is generous because a loaded
    2-core machine runs these several times slower than an idle one; a failure shows the command and the tail of
    the workers' output."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    process = subprocess.Popen(
        command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        stdout, stderr = process.communicate()
        pytest.fail(
            f"{' '.join(command)} ran past {timeout} s; its output ends with:\n{stdout[-3000:]}{stderr[-5000:]}"
        )
    assert process.returncode == 0, (
        f"{' '.join(command)} exited with {process.returncode}:\n" + stdout[-3000:] + stderr[-5000:]
    )


def train_logs(output_dir: Path) -> list[dict]:
    history = json.loads((output_dir / "trainer_state.json").read_text())["log_history"]
    return [entry for entry in history if "loss" in entry]


@pytest.fixture(scope="module")
def lm_setup(tmp_path_factory) -> tuple[Path, list[str]]:
    folder = tmp_path_factory.mktemp("dist")
    (folder / "train.txt").write_text("".join(synthetic_lines(300)), encoding="utf-8")
    word_level_tokenizer(synthetic_lines()).save_pretrained(folder / "tok")
    args = [*TINY_GPT2.split(), "--tokenizer_name", str(folder / "tok"), "--train_file", str(folder / "train.txt"),
            "--block_size", "16", "--max_eval_samples", "4", "--per_device_eval_batch_size", "2", "--head", "moss",
            "--sparsity", "0.3", "--sparsity_warmup_steps", "2", "--max_steps", "4", "--logging_steps", "1",
            "--learning_rate", "1e-3", "--seed", "0", "--train_sampling_strategy", "sequential",
            "--dataloader_drop_last", "--save_strategy", "no", "--use_cpu", "--report_to", "none",
            "--disable_tqdm", "true", "--do_train", "--do_eval"]  # fmt: skip
    return folder, args


def test_two_processes_match_one_process(lm_setup):
    folder, args = lm_setup
    accelerate = shutil.which("accelerate")
    if accelerate is None:
        pytest.skip("the accelerate command is not on PATH")
    # the shipped DDP config; on a machine without GPUs it gives 2 CPU processes over gloo (`--cpu` would start only
    # one); bf16 autocast is turned off to compare with fp32
    config = REPO / "recipes" / "accelerate" / "multi_gpu.yaml"
    launch = [
        accelerate,
        "launch",
        "--config_file",
        str(config),
        "--num_processes",
        "2",
        "--mixed_precision",
        "no",
        "--main_process_port",
        str(free_port()),
    ]
    run([*launch, str(REPO / "recipes" / "causal_lm.py"), *args, "--per_device_train_batch_size", "2",
         "--output_dir", str(folder / "two")], cwd=folder)  # fmt: skip
    recipe("causal_lm").main([*args, "--per_device_train_batch_size", "4", "--output_dir", str(folder / "one")])

    one, two = train_logs(folder / "one"), train_logs(folder / "two")
    assert [e["step"] for e in two] == [1, 2, 3, 4]
    for a, b in zip(one, two, strict=True):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)
        assert b["sparsity/layer_1"] == pytest.approx(a["sparsity/layer_1"], abs=1e-6)  # same schedule on each rank
    assert all(math.isfinite(e["loss"]) for e in two) and two[-1]["loss"] < two[0]["loss"]  # it trains
    results = json.loads((folder / "two" / "all_results.json").read_text())
    assert results["eval_perplexity"] == pytest.approx(math.exp(results["eval_loss"]))
    config = json.loads((folder / "two" / "config.json").read_text())  # saved once, by the main process
    assert config["hf_sparse_attn"]["head"] == "moss" and config["hf_sparse_attn"]["sparsity"] == 0.3


@pytest.mark.parametrize(
    "name, distributed_type",
    [("single_gpu", "NO"), ("multi_gpu", "MULTI_GPU"), ("fsdp", "FSDP"), ("deepspeed_zero2", "DEEPSPEED")],
)
def test_accelerate_configs_load(name, distributed_type):
    from accelerate.commands.config.config_args import load_config_from_file

    config = load_config_from_file(str(REPO / "recipes" / "accelerate" / f"{name}.yaml"))
    assert config.distributed_type == distributed_type
    assert config.mixed_precision == "bf16"
    if name == "fsdp":  # FSDP2 keeps the original modules, which the sparsity callbacks use
        assert config.fsdp_config["fsdp_version"] == 2
        assert config.fsdp_config["fsdp_state_dict_type"] == "FULL_STATE_DICT"  # a normal checkpoint with the patch


FSDP_SCRIPT = """
import datetime, json, sys, torch, torch.distributed as dist, transformers
from torch.distributed.fsdp import fully_shard
import hf_sparse_attn

def model():
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=2, n_head=4, n_embd=32, vocab_size=99, n_positions=64, bos_token_id=0,
                                     eos_token_id=1, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return hf_sparse_attn.patch_model(transformers.GPT2LMHeadModel(config), sparsity=0.3, head="moss")

# generous timeout: on a loaded machine rank 0's reference step below can take minutes while rank 1 waits
dist.init_process_group("gloo", timeout=datetime.timedelta(minutes=15))
rank, world = dist.get_rank(), dist.get_world_size()
ids = torch.randint(3, 99, (2 * world, 16), generator=torch.Generator().manual_seed(1))  # the global batch
sharded = model()
for block in sharded.transformer.h:
    fully_shard(block)
fully_shard(sharded)
optimizer = torch.optim.SGD(sharded.parameters(), lr=0.1)
mine = ids[2 * rank : 2 * rank + 2]
loss = sharded(input_ids=mine, labels=mine).loss
loss.backward()  # FSDP2 reduce-scatters the gradient averaged over the ranks
optimizer.step()
full = {k: v.full_tensor() for k, v in sharded.state_dict().items()}
losses = [torch.zeros(()) for _ in range(world)]
dist.all_gather(losses, loss.detach())
if rank == 0:
    reference = model()  # one process, the whole global batch (equal token counts: mean of means = mean)
    reference(input_ids=ids, labels=ids).loss.backward()
    torch.optim.SGD(reference.parameters(), lr=0.1).step()
    expected = reference.state_dict()
    diff = max((full[k] - expected[k]).abs().max().item() for k in expected)
    json.dump({"keys_equal": sorted(full) == sorted(expected), "max_param_diff": diff,
               "sharded_loss": sum(float(l) for l in losses) / world}, open(sys.argv[1], "w"))
dist.barrier()  # no rank tears gloo down while another still works (a lone early exit aborted rank 1 under load)
dist.destroy_process_group()
"""


def test_fsdp2_sharded_step_matches_unsharded(tmp_path):
    """accelerate routes FSDP only to GPU-like devices (a CPU run becomes plain DDP), so FSDP is exercised here
    directly with torch's ``fully_shard`` on 2 gloo processes: one SGD step of the sharded, patched GPT-2 with a MoSS
    head (tied to the embedding) equals one unsharded step on the global batch."""
    script = tmp_path / "fsdp_step.py"
    script.write_text(textwrap.dedent(FSDP_SCRIPT))
    out = tmp_path / "result.json"
    torchrun = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nnodes",
        "1",
        "--nproc_per_node",
        "2",
        "--rdzv-backend",
        "c10d",
        "--rdzv-endpoint",
        f"127.0.0.1:{free_port()}",
    ]
    run([*torchrun, str(script), str(out)], cwd=tmp_path)
    result = json.loads(out.read_text())
    assert result["keys_equal"]
    assert result["max_param_diff"] < 1e-6  # float32 summation order only
    assert math.isfinite(result["sharded_loss"])
