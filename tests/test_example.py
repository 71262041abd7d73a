"""examples/train_char_rnn.py, run for a few steps at tiny sizes: it learns, its checkpoints resume
where they stopped and load into the model built with torch.nn.RNN, rnn_ext and torch.nn.RNN give
the same losses for the same seed, --amp runs on the CPU, the script runs from the command line, and
under torchrun (two processes, DDP) it trains as one process does on the whole batch.

The example is not part of the installed package: it is imported from its file next to tests/.
"""
import importlib.util
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import rnn_ext
from reference import subprocess_env

EXAMPLE_PATH = Path(__file__).resolve().parents[1] / "examples" / "train_char_rnn.py"
TINY = ["--hidden-size", "32", "--batch-size", "8", "--seq-len", "24", "--sample-length", "20"]
# Per-step training losses of rnn_ext and torch.nn.RNN from the same seed: float32 kernels that sum
# in a different order differ by ~1e-7 relative per operation; over 8 Adam steps the losses (3-4 nats)
# differed by at most 5e-7 on this project's CPU; 1e-4 leaves room for other CPUs and kernels.
SAME_LOSS_TOL = dict(rtol=0, atol=1e-4)


def load_example():
    spec = importlib.util.spec_from_file_location("train_char_rnn", EXAMPLE_PATH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


example = load_example()
VOCAB_SIZE = example.Vocabulary.from_text(example.load_text()).size


def run_example(*argv):
    """example.main() at tiny sizes with extra command-line arguments; returns its TrainingRun."""
    return example.main([*TINY, *map(str, argv)])


def test_loss_goes_down_and_rnn_weights_learn(capsys):
    torch.manual_seed(1)
    initial = example.CharRNN(VOCAB_SIZE, 32)
    run = run_example("--steps", 60, "--seed", 1)

    losses = run.losses
    assert len(losses) == run.step == 60 and all(math.isfinite(loss) for loss in losses)
    assert losses[0] == pytest.approx(math.log(run.vocab.size), abs=0.3)  # a fresh model guesses uniformly
    assert sum(losses[-10:]) / 10 < losses[0] - 0.8
    assert run.val_loss < losses[0] - 0.5
    # The RNN itself learned, not only the embedding and output bias.
    trained = run.model.rnn.state_dict()
    for name, before in initial.rnn.state_dict().items():
        assert (trained[name] - before).abs().max() > 1e-3, name
    assert run.sample.startswith("BRUTUS.\n") and len(run.sample) == len("BRUTUS.\n") + 20
    out = capsys.readouterr().out
    assert "validation loss:" in out and "--- sample" in out


def test_checkpoint_resumes_where_it_stopped(tmp_path):
    checkpoint = tmp_path / "ckpt.pt"
    straight = run_example("--steps", 12)
    first_half = run_example("--steps", 6, "--save", checkpoint)
    saved = torch.load(checkpoint, weights_only=True)
    assert saved["step"] == 6 and saved["losses"] == first_half.losses
    for name, tensor in first_half.model.state_dict().items():
        assert torch.equal(saved["model"][name], tensor), name

    resumed = run_example("--steps", 12, "--resume", checkpoint)
    assert resumed.step == 12 and len(resumed.losses) == 12
    assert resumed.losses[:6] == first_half.losses
    # Same batches and the optimizer's moments restored: the second half retraces the straight run.
    torch.testing.assert_close(resumed.losses, straight.losses)
    torch.testing.assert_close(resumed.model.state_dict(), straight.model.state_dict())


def test_resume_refuses_a_checkpoint_of_another_size(tmp_path):
    checkpoint = tmp_path / "ckpt.pt"
    run_example("--steps", 1, "--save", checkpoint, "--sample-length", 0)
    with pytest.raises(SystemExit, match="pass the --hidden-size it was trained with"):
        run_example("--steps", 2, "--resume", checkpoint, "--hidden-size", 16)


def test_rnn_ext_checkpoint_loads_into_the_torch_model(tmp_path):
    checkpoint = tmp_path / "ckpt.pt"
    run = run_example("--impl", "rnn_ext", "--steps", 5, "--save", checkpoint)
    state = torch.load(checkpoint, weights_only=True)["model"]

    torch_model = example.CharRNN(run.vocab.size, 32, impl="torch")
    assert type(torch_model.rnn) is torch.nn.RNN and type(run.model.rnn) is rnn_ext.RNN
    assert list(torch_model.state_dict()) == list(state)
    torch_model.load_state_dict(state, strict=True)

    ids = run.vocab.encode("MENENIUS.\nWhat work's, my countrymen, in hand?")[None].repeat(3, 1)
    with torch.no_grad():
        ours, ours_hidden = run.model(ids)
        theirs, theirs_hidden = torch_model(ids)
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(ours_hidden, theirs_hidden, rtol=1e-4, atol=1e-5)


def test_both_implementations_start_alike_and_give_the_same_losses():
    torch.manual_seed(3)
    ours = example.CharRNN(VOCAB_SIZE, 32, impl="rnn_ext").state_dict()
    torch.manual_seed(3)
    theirs = example.CharRNN(VOCAB_SIZE, 32, impl="torch").state_dict()
    assert list(ours) == list(theirs)
    for name in ours:
        assert torch.equal(ours[name], theirs[name]), name

    rnn_ext_run = run_example("--impl", "rnn_ext", "--steps", 8, "--seed", 3)
    torch_run = run_example("--impl", "torch", "--steps", 8, "--seed", 3)
    torch.testing.assert_close(rnn_ext_run.losses, torch_run.losses, **SAME_LOSS_TOL)
    assert rnn_ext_run.val_loss == pytest.approx(torch_run.val_loss, abs=1e-4)


def test_amp_runs_on_cpu_in_bfloat16():
    amp_run = run_example("--amp", "--steps", 6)
    full_run = run_example("--steps", 6)
    assert all(math.isfinite(loss) for loss in amp_run.losses)
    assert amp_run.losses != full_run.losses  # autocast changed the arithmetic...
    torch.testing.assert_close(amp_run.losses, full_run.losses, rtol=0, atol=0.02)  # ...by rounding (3e-4 seen)
    ids = amp_run.vocab.encode("ROME")[None]
    with example.autocast(torch.device("cpu"), amp=True):
        output, _ = amp_run.model.rnn(amp_run.model.embedding(ids))
    assert output.dtype == torch.bfloat16


def test_plot_trains_both_implementations(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    plot = tmp_path / "loss.png"
    run_example("--steps", 3, "--plot", plot)
    assert plot.read_bytes().startswith(b"\x89PNG")
    assert "largest loss difference over 3 steps" in capsys.readouterr().out


def test_plot_without_matplotlib_is_refused_before_training(monkeypatch, capsys):
    monkeypatch.setattr(example.importlib.util, "find_spec", lambda name: None)  # nothing installed
    with pytest.raises(SystemExit):
        example.parse_args([*TINY, "--plot", "loss.png"])
    assert "--plot needs matplotlib" in capsys.readouterr().err


def test_script_runs_from_the_command_line(tmp_path):
    result = subprocess.run(
        [sys.executable, str(EXAMPLE_PATH), *TINY, "--steps", "2"],
        capture_output=True, text=True, timeout=120, cwd=tmp_path, env=subprocess_env(),
    )
    assert result.returncode == 0, result.stderr
    assert "validation loss:" in result.stdout
    assert "rnn_ext: 100%" in result.stderr  # the tqdm progress bar


def test_torchrun_two_processes_train_as_one_on_the_whole_batch(tmp_path):
    # DDP over gloo: each rank trains on half of every batch of 8 windows; the logged losses and
    # the trained weights are those of one process training on all 8.
    single = run_example("--steps", 3, "--save", tmp_path / "single.pt")
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", str(EXAMPLE_PATH),
         *TINY, "--steps", "3", "--save", str(tmp_path / "ddp.pt")],
        capture_output=True, text=True, timeout=300, cwd=tmp_path, env=subprocess_env(),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("validation loss:") == 1  # rank 0 alone reports
    saved = torch.load(tmp_path / "ddp.pt", weights_only=True)
    assert saved["step"] == 3
    torch.testing.assert_close(saved["losses"], single.losses, **SAME_LOSS_TOL)
    torch.testing.assert_close(saved["model"], single.model.state_dict(), rtol=1e-4, atol=1e-5)


def test_batch_must_split_evenly_over_torchrun_processes(monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "3")
    with pytest.raises(SystemExit):
        example.parse_args([*TINY])
    assert "--batch-size 8: torchrun runs 3 processes" in capsys.readouterr().err


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available() or not rnn_ext.cuda_kernels_built(), reason="needs a CUDA GPU and kernels")
def test_cuda_matches_cpu_and_amp_runs():
    cpu_run = run_example("--steps", 4)
    cuda_run = run_example("--steps", 4, "--device", "cuda")
    torch.testing.assert_close(cuda_run.losses, cpu_run.losses, rtol=0, atol=1e-3)
    amp_run = run_example("--steps", 4, "--device", "cuda", "--amp")
    assert all(math.isfinite(loss) for loss in amp_run.losses)


@pytest.mark.parametrize("impl", ["rnn_ext", "torch"])
def test_sampling_steps_match_the_layer(impl):
    # sample_text feeds each drawn character through CharRNN.step (rnn_ext.rnn_cell per layer on
    # the RNN's weights): step by step, it must give the layer's logits and state.
    example = load_example()
    torch.manual_seed(0)
    model = example.CharRNN(vocab_size=11, hidden_size=16, impl=impl).eval()
    ids = torch.randint(0, 11, (2, 7))
    with torch.no_grad():
        logits, hidden = model(ids)
        _, state = model(ids[:, :1])
        for t in range(1, 7):
            step_logits, state = model.step(ids[:, t], state)
            torch.testing.assert_close(step_logits, logits[:, t])
    torch.testing.assert_close(state, hidden)
