"""DDP through gimplib.train.engine.fit: 2 CPU processes on gloo, localhost only.

The test starts two copies of this file as torchrun would (RANK / WORLD_SIZE / MASTER_ADDR /
MASTER_PORT in the environment). Each rank trains on its half of every batch; DDP averages
the gradients, so the replicas must end bit-identical, and equal (up to float summation
order) to one process training on the whole batches.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import torch
from torch import nn

N, DIM, PER_RANK_BATCH, EPOCHS = 32, 8, 4, 3


class _Points(torch.utils.data.Dataset):
    def __init__(self) -> None:
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(N, DIM, generator=g)
        self.y = (self.x[:, 0] + 0.5 * self.x[:, 1] > 0).long()

    def __len__(self) -> int:
        return N

    def __getitem__(self, i: int) -> dict:
        return {"x": self.x[i], "y": self.y[i]}


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(DIM, 16), nn.ReLU(), nn.Linear(16, 2))


def _step(model: nn.Module, batch: dict) -> dict:
    return {"loss": nn.functional.cross_entropy(model(batch["x"]), batch["y"])}


def _eval(model: nn.Module) -> dict:
    data = _Points()
    return {"val_accuracy": float((model(data.x).argmax(1) == data.y).float().mean())}


def _train(out_dir: Path, batch_size: int) -> nn.Module:
    from gimplib.train.engine import fit

    res = fit(_model(), _Points(), step_fn=_step, out_dir=out_dir, config={"test": "ddp"}, num_epochs=EPOCHS,
              lr=1e-2, batch_size=batch_size, device="cpu", eval_fn=_eval, select="val_accuracy", progress=False)
    return res.model


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_two_cpu_ranks_match_single_process(tmp_path):
    port = _free_port()
    root = Path(__file__).resolve().parents[1]
    procs = []
    for rank in range(2):
        env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(port), OMP_NUM_THREADS="1", PYTHONPATH=str(root))
        procs.append(subprocess.Popen([sys.executable, __file__, str(tmp_path / "ddp")], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    for p in procs:
        out, _ = p.communicate(timeout=120)
        assert p.returncode == 0, out

    w0 = torch.load(tmp_path / "ddp" / "rank0.pt", weights_only=True)
    w1 = torch.load(tmp_path / "ddp" / "rank1.pt", weights_only=True)
    ckpt = torch.load(tmp_path / "ddp" / "checkpoint.pt", weights_only=True)
    assert ckpt["epoch"] == EPOCHS - 1 and len(ckpt["history"]) == EPOCHS
    single = _train(tmp_path / "single", batch_size=2 * PER_RANK_BATCH).state_dict()
    init = _model().state_dict()
    for k in w0:
        assert torch.equal(w0[k], w1[k]), f"replicas differ at {k}"
        assert torch.equal(w0[k], ckpt["model"][k]), f"rank 0 checkpoint differs at {k}"
        assert not torch.allclose(w0[k], init[k]), f"{k} did not train"
        torch.testing.assert_close(w0[k], single[k], rtol=1e-5, atol=1e-6, msg=f"DDP vs single process at {k}")
    # only rank 0 wrote the run files
    assert (tmp_path / "ddp" / "metrics.csv").read_text().count("\n") == EPOCHS + 1


if __name__ == "__main__":  # a DDP rank, started by the test above
    torch.set_num_threads(1)
    out = Path(sys.argv[1])
    model = _train(out, batch_size=PER_RANK_BATCH)
    torch.save(model.state_dict(), out / f"rank{os.environ['RANK']}.pt")
    import torch.distributed as dist

    dist.destroy_process_group()
