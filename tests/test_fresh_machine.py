"""What a new user meets first: README's main command on a machine that has never seen the project,
and loader workers started by a process whose library thread pools are already running.

Both failed on the old fork default: the parent generated the synthetic set with OpenCV (which
starts OpenCV's thread pool), then forked the loader workers, whose first cv2.setNumThreads(1)
waited for ever on a lock owned by a thread that does not exist in the child.
"""
import os
import re
import shlex

from scripts import ROOT, clean_env, run_script

MARKER = "<!-- main-command -->"


def readme_main_command() -> str:
    """The command in the code block after README's main-command marker."""
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        text = f.read()
    assert MARKER in text, "README.md lost its main-command marker"
    block = re.search(r"```\w*\n(.*?)\n```", text[text.index(MARKER):], re.S)
    assert block, "no code block after README's main-command marker"
    return block.group(1).strip()


def test_readme_main_command_trains_and_evaluates_on_an_empty_home_and_cache(tmp_path):
    command = readme_main_command()
    install, _, run = command.partition("&&")
    # The install half is what the test command (and so CI) runs before any test: check it is that.
    assert install.split()[:2] == ["pip", "install"] and "requirements-cpu.txt" in install, install
    argv = shlex.split(run)
    assert argv[:2] == ["python", "launch/run.py"], run
    home = tmp_path / "home"
    home.mkdir()
    env = {k: v for k, v in os.environ.items()
           if k not in ("DEEPLAB_CACHE", "XDG_CACHE_HOME", "RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(HOME=str(home), MPLCONFIGDIR=str(tmp_path / "mpl"))
    # Fewer iterations than the demo; everything else (preset, model, data, workers) as a user gets it.
    extra = ["--iters", "12", "--log-interval", "4", "--eval-interval", "0", "--work-dir", str(tmp_path / "work")]
    proc = run_script([*argv[1:], *extra], timeout=300, env=env, merge_output=True,
                      what="README's main command")
    out = proc.stdout
    assert proc.returncode == 0, out[-4000:]
    for i in (4, 8, 12):
        assert re.search(rf"iter {i}/12 +loss \d", out), out[-4000:]
    assert "| Class" in out and re.search(r"mIoU: \d+\.\d+", out), out[-4000:]
    generated = home / ".cache" / "deeplab-trainer"  # the cache really started empty and was filled
    assert any(p.name.startswith("synthetic-") for p in generated.iterdir())


WARM_PARENT = r"""
import os, sys, threading, time
import cv2, numpy as np, torch
from data_loader.loader import build_train_loader

root = sys.argv[1]
# Start every kind of pool a training process has by the time it builds a loader: OpenCV's
# (large images; small ones run single-threaded), OpenMP's (a torch op on 2 threads), and a
# writer thread that keeps taking a lock, as a logger or TensorBoard writer does.
big = np.random.default_rng(0).integers(0, 255, (2048, 4096, 3), dtype=np.uint8)
for _ in range(3):
    cv2.resize(big, (3000, 1500))
    cv2.cvtColor(big, cv2.COLOR_BGR2HSV)
torch.set_num_threads(2)
torch.randn(512, 512) @ torch.randn(512, 512)
lock = threading.Lock()

def writer():
    with open(os.devnull, "w") as f:
        while True:
            with lock:
                f.write("x" * 4096)

threading.Thread(target=writer, daemon=True).start()
assert cv2.getNumThreads() > 1 and threading.active_count() > 1
for attempt in range(10):
    with build_train_loader(root, workers=2, seed=attempt, batch_size=1, crop=(32, 64), scale=(128, 64),
                            timeout=10) as loader:
        for _, batch in zip(range(3), loader):
            assert batch.image.shape == (1, 32, 64, 3)
    print("drained", attempt, flush=True)
"""


def test_loaders_start_and_drain_after_the_parent_warmed_its_thread_pools(tmp_path):
    from data_loader.synthetic import generate
    root = generate(str(tmp_path / "data"), num_train=4, num_val=0, size=(128, 64), seed=3)
    env = clean_env({"PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")})
    proc = run_script(["-c", WARM_PARENT, root], timeout=150, env=env, merge_output=True,
                      what="a parent with warm thread pools building loaders")
    out = proc.stdout
    assert proc.returncode == 0, out[-4000:]
    assert [line for line in out.splitlines() if line.startswith("drained")] == [f"drained {i}" for i in range(10)]
