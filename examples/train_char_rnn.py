"""Train a character-level language model whose recurrent core is ``rnn_ext.RNN``.

The model reads characters and predicts the next one: an embedding, a 2-layer tanh RNN
(``rnn_ext.RNN``, or ``torch.nn.RNN`` with ``--impl torch``) and a linear layer to logits over the
characters. It trains on two Shakespeare plays shipped in ``examples/data/`` (public domain; see
the README there) on random windows of the first 90% of the text, and reports the loss on the last
10%, which it never trains on.

With no arguments it trains for about a minute on a 2-core CPU, with a progress bar showing the
loss and characters/s, then prints a generated sample and the validation loss::

    python examples/train_char_rnn.py                        # rnn_ext.RNN, about a minute
    python examples/train_char_rnn.py --impl torch           # the same model on torch.nn.RNN
    python examples/train_char_rnn.py --steps 100 --plot loss.png   # train both, plot both curves
    python examples/train_char_rnn.py --steps 200 --save ckpt.pt    # then continue it:
    python examples/train_char_rnn.py --steps 400 --resume ckpt.pt
    python examples/train_char_rnn.py --amp                  # CPU: bfloat16 autocast
    python examples/train_char_rnn.py --device cuda --amp    # CUDA: float16 autocast + GradScaler
    torchrun --nproc_per_node=2 examples/train_char_rnn.py   # DistributedDataParallel, 2 processes

For the same ``--seed`` both implementations start from the same weights (the RNN's are drawn by
``torch.nn.RNN`` and copied into ``rnn_ext.RNN``) and see the same batches, so their losses agree
up to float rounding. A checkpoint holds the model's ``state_dict`` (the same keys for both
implementations: one written with ``--impl rnn_ext`` loads into the model built with
``torch.nn.RNN``), the optimizer, the step, the loss history and the batch sampler's state, so a
resumed run continues the same sequence of batches.

Under ``torchrun`` (``WORLD_SIZE`` > 1) each process trains the model wrapped in
``DistributedDataParallel`` (gloo on the CPU, NCCL on CUDA, one GPU per process): every rank draws
the same global batch of ``--batch-size`` windows and trains on its own equal share of them, and
DDP averages the gradients, so the run takes the same steps, and logs the same losses, as one
process training on the whole batch. Rank 0 alone shows progress, saves, evaluates and samples.
"""
import argparse
import contextlib
import gc
import importlib.util
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

import rnn_ext

DATA_DIR = Path(__file__).resolve().parent / "data"
VALIDATION_FRACTION = 0.1
EMBEDDING_SIZE = 64
NUM_LAYERS = 2
GRAD_CLIP_NORM = 1.0
IMPLEMENTATIONS = ("rnn_ext", "torch")
# Autocast dtype per device type: bfloat16 is what the CPU autocasts to; float16 (with a
# GradScaler against underflowing gradients) is the usual choice on CUDA.
AMP_DTYPES = {"cpu": torch.bfloat16, "cuda": torch.float16}
EVAL_BATCH_WINDOWS = 128


# -- data ---------------------------------------------------------------------------------------


def load_text(data_dir=DATA_DIR):
    """Every ``*.txt`` file in data_dir, in name order, joined by a blank line."""
    paths = sorted(Path(data_dir).glob("*.txt"))
    if not paths:
        raise FileNotFoundError(f"no *.txt files in {data_dir}")
    return "\n\n".join(path.read_text(encoding="utf-8") for path in paths)


@dataclass(frozen=True)
class Vocabulary:
    """The characters of the text, in sorted order; a character's id is its index."""

    chars: str

    @classmethod
    def from_text(cls, text):
        return cls("".join(sorted(set(text))))

    @property
    def size(self):
        return len(self.chars)

    def encode(self, text):
        index = {char: i for i, char in enumerate(self.chars)}
        return torch.tensor([index[char] for char in text], dtype=torch.long)

    def decode(self, ids):
        return "".join(self.chars[i] for i in ids)


def split_train_validation(ids, validation_fraction=VALIDATION_FRACTION):
    """(first part, last validation_fraction of ids): the validation text is never trained on."""
    cut = len(ids) - int(len(ids) * validation_fraction)
    return ids[:cut], ids[cut:]


def random_windows(ids, batch_size, seq_len, generator):
    """batch_size random windows of ids: inputs [B, L] and targets [B, L], the next characters."""
    starts = torch.randint(0, len(ids) - seq_len, (batch_size,), generator=generator)
    offsets = torch.arange(seq_len + 1)
    windows = ids[starts[:, None] + offsets]
    return windows[:, :-1], windows[:, 1:]


def consecutive_windows(ids, seq_len):
    """ids cut into non-overlapping windows: inputs [N, L] and targets [N, L]."""
    count = (len(ids) - 1) // seq_len
    inputs = ids[: count * seq_len].view(count, seq_len)
    targets = ids[1 : count * seq_len + 1].view(count, seq_len)
    return inputs, targets


# -- model --------------------------------------------------------------------------------------


def make_rnn(impl, input_size, hidden_size, num_layers):
    """A batch-first tanh RNN of either implementation, with torch.nn.RNN's initial weights.

    The weights are drawn by a torch.nn.RNN in both cases; for rnn_ext they are copied into an
    rnn_ext.RNN built without initialising (so it draws nothing from the random generator and the
    layers built after it get the same weights too).
    """
    sizes = dict(input_size=input_size, hidden_size=hidden_size, num_layers=num_layers, batch_first=True)
    reference = nn.RNN(**sizes)
    if impl == "torch":
        return reference
    if impl != "rnn_ext":
        raise ValueError(f"impl must be one of {IMPLEMENTATIONS}, got {impl!r}")
    rnn = nn.utils.skip_init(rnn_ext.RNN, **sizes)
    rnn.load_state_dict(reference.state_dict())
    return rnn


class CharRNN(nn.Module):
    """Embedding -> RNN -> linear: next-character logits for every position of the input."""

    def __init__(self, vocab_size, hidden_size, impl="rnn_ext", embedding_size=EMBEDDING_SIZE, num_layers=NUM_LAYERS):
        super().__init__()
        self.embedding = nn.Embedding(vocab_size, embedding_size)
        self.rnn = make_rnn(impl, embedding_size, hidden_size, num_layers)
        self.head = nn.Linear(hidden_size, vocab_size)

    def forward(self, ids, hidden=None):
        """ids [B, L] -> (logits [B, L, vocab], hidden [layers, B, H] after the last character)."""
        output, hidden = self.rnn(self.embedding(ids), hidden)
        return self.head(output), hidden

    def step(self, ids, hidden):
        """One character per row, ids [B] -> (logits [B, vocab], hidden [layers, B, H]): each layer
        one rnn_ext.rnn_cell step on the RNN's own weights (the same names in nn.RNN and rnn_ext.RNN)."""
        x = self.embedding(ids)
        states = []
        for layer in range(self.rnn.num_layers):
            weights = [getattr(self.rnn, f"{name}_l{layer}") for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")]
            x = rnn_ext.rnn_cell(x, hidden[layer], *weights, nonlinearity=self.rnn.nonlinearity)
            states.append(x)
        return self.head(x), torch.stack(states)


def model_config(vocab_size, hidden_size):
    """What a checkpoint records of the model's shape, to check against on --resume."""
    return {"vocab_size": vocab_size, "hidden_size": hidden_size, "embedding_size": EMBEDDING_SIZE, "num_layers": NUM_LAYERS}


# -- distributed training (torchrun) -------------------------------------------------------------


@dataclass(frozen=True)
class Distributed:
    """This process's place in a torchrun job; rank 0 of 1 when the script runs on its own."""

    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")  # where this process's collectives run

    @property
    def active(self):
        return self.world_size > 1

    @property
    def is_main(self):
        """Whether this process logs, saves, evaluates and samples."""
        return self.rank == 0

    def shard(self, batch):
        """This rank's equal share of the rows of a global batch [batch_size, ...]."""
        per_rank = batch.size(0) // self.world_size
        return batch[self.rank * per_rank : (self.rank + 1) * per_rank]

    def mean(self, value):
        """A float averaged over the ranks (the global batch's loss from the shards' losses)."""
        if not self.active:
            return value
        total = torch.tensor([value], dtype=torch.float64, device=self.device)
        dist.all_reduce(total)
        return total.item() / self.world_size

    def wrap(self, model):
        """The model as this process trains it: in DistributedDataParallel when distributed."""
        if not self.active:
            return model
        return DistributedDataParallel(model, device_ids=[self.device.index] if self.device.type == "cuda" else None)


def start_distributed(device):
    """Join the torchrun job this process belongs to (WORLD_SIZE > 1): gloo on the CPU, NCCL on
    CUDA with this process's GPU, cuda:LOCAL_RANK. Returns (Distributed, the device to train on)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return Distributed(device=device), device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Distributed(dist.get_rank(), dist.get_world_size(), device), device


def stop_distributed():
    """Leave the torchrun job. The DDP wrappers (freed only by the cycle collector) and then the
    process group are freed here, while Python is alive: a gloo thread that drops its last work
    item during interpreter shutdown aborts the process ("terminate called without an active
    exception"), now and then, with torch.nn.RNN as with rnn_ext.RNN."""
    gc.collect()
    dist.destroy_process_group()
    gc.collect()


# -- training -----------------------------------------------------------------------------------


def autocast(device, amp):
    """torch.autocast in AMP_DTYPES[device.type] with --amp, otherwise nothing."""
    if not amp:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=AMP_DTYPES[device.type])


def next_char_loss(model, inputs, targets):
    """Mean cross-entropy of the model's next-character predictions."""
    logits, _ = model(inputs)
    return nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), targets.reshape(-1))


@dataclass
class TrainingRun:
    """What train() returns; main() fills in val_loss and sample."""

    impl: str
    model: CharRNN
    vocab: Vocabulary
    losses: list = field(default_factory=list)  # training loss of every step, from step 0 (across resumes)
    step: int = 0  # steps trained in all
    start_step: int = 0  # the step this run started from (the checkpoint's, with --resume)
    seconds: float = 0.0  # time of this run's training steps
    characters: int = 0  # characters this run trained on
    val_loss: float = None
    sample: str = None

    @property
    def chars_per_second(self):
        return self.characters / self.seconds if self.seconds > 0 else float("nan")


def save_checkpoint(path, run, optimizer, scaler, batch_generator):
    torch.save(
        {
            "model": run.model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "grad_scaler": scaler.state_dict(),
            "step": run.step,
            "losses": run.losses,
            "batch_generator": batch_generator.get_state(),
            "model_config": model_config(run.vocab.size, run.model.rnn.hidden_size),
            "vocabulary": run.vocab.chars,
            "impl": run.impl,
        },
        path,
    )


def restore_checkpoint(path, run, optimizer, scaler, batch_generator):
    """Load a save_checkpoint() file into the run, optimizer, scaler and sampler, after checking
    that it was written for the same text and model sizes."""
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    if checkpoint["vocabulary"] != run.vocab.chars:
        raise SystemExit(f"--resume {path}: the checkpoint was trained on a text with other characters")
    expected = model_config(run.vocab.size, run.model.rnn.hidden_size)
    if checkpoint["model_config"] != expected:
        raise SystemExit(
            f"--resume {path}: the checkpoint's model is {checkpoint['model_config']}, the arguments "
            f"ask for {expected}: pass the --hidden-size it was trained with"
        )
    run.model.load_state_dict(checkpoint["model"])
    optimizer.load_state_dict(checkpoint["optimizer"])
    if checkpoint["grad_scaler"]:  # empty when saved without a GradScaler (CPU, or no --amp)
        scaler.load_state_dict(checkpoint["grad_scaler"])
    batch_generator.set_state(checkpoint["batch_generator"])
    run.step = run.start_step = checkpoint["step"]
    run.losses = list(checkpoint["losses"])


def train(args, impl, progress=True, distributed=Distributed()):
    """Train (or, with args.resume, continue training) the model on ``impl`` up to args.steps steps.

    Model weights come from args.seed, batches from a generator seeded with args.seed too, so
    two runs with the same seed and arguments see the same weights and the same batches. Under
    torchrun each rank trains on its shard of every batch (see Distributed); the losses recorded
    are the whole batch's.
    """
    device = torch.device(args.device)
    text = load_text()
    vocab = Vocabulary.from_text(text)
    train_ids, _ = split_train_validation(vocab.encode(text))

    torch.manual_seed(args.seed)
    model = CharRNN(vocab.size, args.hidden_size, impl=impl).to(device)
    trained = distributed.wrap(model)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    scaler = torch.amp.GradScaler(device.type, enabled=args.amp and AMP_DTYPES[device.type] == torch.float16)
    batch_generator = torch.Generator().manual_seed(args.seed)
    run = TrainingRun(impl, model, vocab)
    if args.resume:
        restore_checkpoint(args.resume, run, optimizer, scaler, batch_generator)

    model.train()
    bar = tqdm(total=args.steps, initial=run.step, desc=impl, unit="step",
               disable=not (progress and distributed.is_main), dynamic_ncols=True)
    start = time.perf_counter()
    while run.step < args.steps:
        inputs, targets = random_windows(train_ids, args.batch_size, args.seq_len, batch_generator)
        shard_inputs, shard_targets = distributed.shard(inputs).to(device), distributed.shard(targets).to(device)
        loss = distributed.mean(training_step(trained, optimizer, scaler, shard_inputs, shard_targets, device, args.amp))
        run.losses.append(loss)
        run.step += 1
        run.characters += inputs.numel()
        run.seconds = time.perf_counter() - start
        bar.set_postfix({"loss": f"{loss:.3f}", "chars/s": f"{run.chars_per_second:,.0f}"}, refresh=False)
        bar.update()
    bar.close()
    if args.save and distributed.is_main:
        save_checkpoint(args.save, run, optimizer, scaler, batch_generator)
    return run


def training_step(model, optimizer, scaler, inputs, targets, device, amp):
    """One optimizer step on one batch (gradients clipped to GRAD_CLIP_NORM); returns the loss."""
    optimizer.zero_grad(set_to_none=True)
    with autocast(device, amp):
        loss = next_char_loss(model, inputs, targets)
    scaler.scale(loss).backward()
    scaler.unscale_(optimizer)  # clip the true gradients, not the scaled ones
    nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP_NORM)
    scaler.step(optimizer)
    scaler.update()
    return loss.item()


# -- evaluation and sampling --------------------------------------------------------------------


@torch.no_grad()
def validation_loss(model, ids, seq_len, device, amp=False):
    """Mean next-character loss over ids cut into windows of seq_len (state reset per window,
    as in training)."""
    model.eval()
    inputs, targets = consecutive_windows(ids, seq_len)
    total = 0.0
    for first in range(0, len(inputs), EVAL_BATCH_WINDOWS):
        batch_inputs = inputs[first : first + EVAL_BATCH_WINDOWS].to(device)
        batch_targets = targets[first : first + EVAL_BATCH_WINDOWS].to(device)
        with autocast(device, amp):
            total += next_char_loss(model, batch_inputs, batch_targets).item() * batch_targets.numel()
    model.train()
    return total / targets.numel()


@torch.no_grad()
def sample_text(model, vocab, prompt, length, temperature, seed, device):
    """The prompt followed by ``length`` characters drawn one at a time from the model's
    predictions (softmax of logits / temperature), carrying the RNN state along: the prompt runs
    through the RNN layer, each drawn character through one cell step per layer (CharRNN.step)."""
    model.eval()
    generator = torch.Generator(device=device).manual_seed(seed)
    ids = vocab.encode(prompt).to(device)[None]
    logits, hidden = model(ids)
    logits = logits[:, -1]
    drawn = []
    for _ in range(length):
        probabilities = torch.softmax(logits[0].float() / temperature, dim=-1)
        next_id = torch.multinomial(probabilities, 1, generator=generator)
        drawn.append(int(next_id))
        logits, hidden = model.step(next_id, hidden)
    model.train()
    return prompt + vocab.decode(drawn)


# -- plotting -----------------------------------------------------------------------------------


def plot_loss_curves(path, runs):
    """A PNG at path: each run's training loss per step (top) and their difference (bottom)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(8, 6), sharex=True, height_ratios=(3, 1))
    styles = {"rnn_ext": dict(linestyle="-", linewidth=2.5, alpha=0.6), "torch": dict(linestyle="--", linewidth=1)}
    for run in runs:
        label = f"{run.impl} ({run.chars_per_second:,.0f} chars/s)"
        top.plot(range(1, len(run.losses) + 1), run.losses, label=label, **styles.get(run.impl, {}))
    top.set_ylabel("training loss (nats/char)")
    top.set_title("char-RNN, same seed: rnn_ext.RNN vs torch.nn.RNN")
    top.legend()
    top.grid(alpha=0.3)
    first, second = runs[0], runs[1]
    steps = min(len(first.losses), len(second.losses))
    difference = [a - b for a, b in zip(first.losses[:steps], second.losses[:steps])]
    bottom.plot(range(1, steps + 1), difference, color="black", linewidth=1)
    bottom.set_ylabel(f"{first.impl} − {second.impl}")
    bottom.set_xlabel("step")
    bottom.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# -- command line -------------------------------------------------------------------------------


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description="Train a character-level language model (embedding -> 2-layer RNN -> linear) on two "
        "Shakespeare plays, with rnn_ext.RNN or torch.nn.RNN, then print a sample and the validation loss.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--impl", choices=IMPLEMENTATIONS, default="rnn_ext", help="RNN implementation to train")
    parser.add_argument("--steps", type=int, default=650,
                        help="train up to this many optimizer steps in all (with --resume: including the checkpoint's)")
    parser.add_argument("--batch-size", type=int, default=64, help="windows per batch")
    parser.add_argument("--seq-len", type=int, default=100, help="characters per window (backpropagation length)")
    parser.add_argument("--hidden-size", type=int, default=256, help="RNN hidden size (both layers)")
    parser.add_argument("--lr", type=float, default=3e-3,
                        help="Adam learning rate (with --resume, the checkpoint's optimizer state keeps its own)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the initial weights, the batches and the sample")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    parser.add_argument("--amp", action="store_true",
                        help="mixed precision: torch.autocast in bfloat16 on CPU, float16 with a GradScaler on CUDA")
    parser.add_argument("--save", metavar="PATH", help="write a checkpoint (model, optimizer, step, ...) here at the end")
    parser.add_argument("--resume", metavar="PATH", help="continue from a checkpoint written by --save")
    parser.add_argument("--plot", metavar="PATH",
                        help="also train the other implementation with the same seed and write a PNG of both loss curves")
    parser.add_argument("--prompt", default="BRUTUS.\n", help="text the sample starts from (default: %(default)r)")
    parser.add_argument("--sample-length", type=int, default=400, help="characters to generate after the prompt")
    parser.add_argument("--temperature", type=float, default=0.8, help="sampling temperature (lower: safer choices)")
    args = parser.parse_args(argv)
    check_args(parser, args)
    return args


def check_args(parser, args):
    for name in ("steps", "batch_size", "seq_len", "hidden_size"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    world_size = int(os.environ.get("WORLD_SIZE", "1"))  # torchrun's process count
    if args.batch_size % world_size:
        parser.error(f"--batch-size {args.batch_size}: torchrun runs {world_size} processes; the batch must split evenly")
    if args.plot and importlib.util.find_spec("matplotlib") is None:
        parser.error("--plot needs matplotlib: pip install matplotlib")
    if args.sample_length < 0 or args.temperature <= 0:
        parser.error("--sample-length must be >= 0 and --temperature > 0")
    try:
        device = torch.device(args.device)
    except RuntimeError:
        parser.error(f"--device {args.device}: not a device name")
    if device.type not in AMP_DTYPES:
        parser.error(f"--device {args.device}: this example runs on cpu or cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: torch sees no CUDA GPU")
    if device.type == "cuda" and not rnn_ext.cuda_kernels_built() and (args.impl == "rnn_ext" or args.plot):
        parser.error(f"--device {args.device}: this build of rnn_ext has no CUDA kernels (rebuild it with a GPU visible)")
    text = load_text()
    longest = int(len(text) * VALIDATION_FRACTION) - 1
    if args.seq_len > longest:
        parser.error(f"--seq-len must be at most {longest}, to cut the validation text into windows")
    if not args.prompt:
        parser.error("--prompt must hold at least one character")
    unknown = set(args.prompt) - set(Vocabulary.from_text(text).chars)
    if unknown:
        parser.error(f"--prompt holds characters the text never uses: {''.join(sorted(unknown))!r}")


def report(run, temperature, total_seconds):
    """Print what the run trained, its sample and its validation loss."""
    if run.step > run.start_step:
        trained = (f"steps {run.start_step + 1}-{run.step}: {run.characters:,} characters in {run.seconds:.1f} s "
                   f"({run.chars_per_second:,.0f} chars/s)")
    else:
        trained = f"nothing to train: the checkpoint is already at step {run.step}"
    print(f"\n{run.impl}, {trained}")
    print(f"training loss: {run.losses[0]:.3f} at step 1, {run.losses[-1]:.3f} at step {run.step}")
    print(f"\n--- sample (temperature {temperature}) ---\n{run.sample}\n---\n")
    print(f"validation loss: {run.val_loss:.4f} nats/char ({run.val_loss / math.log(2):.3f} bits/char)")
    print(f"{total_seconds:.1f} s for training, validation and sampling")


def main(argv=None):
    args = parse_args(argv)
    distributed, device = start_distributed(torch.device(args.device))
    args.device = str(device)
    try:
        return run_and_report(args, device, distributed)
    finally:
        if distributed.active:
            stop_distributed()


def run_and_report(args, device, distributed):
    """Train; on rank 0 evaluate, sample and report. With --plot, then train the other implementation
    too (every rank) and plot both (rank 0)."""
    started = time.perf_counter()
    run = train(args, args.impl, distributed=distributed)
    if distributed.is_main:
        _, validation_ids = split_train_validation(run.vocab.encode(load_text()))
        run.val_loss = validation_loss(run.model, validation_ids, args.seq_len, device, args.amp)
        run.sample = sample_text(run.model, run.vocab, args.prompt, args.sample_length, args.temperature, args.seed, device)
        report(run, args.temperature, time.perf_counter() - started)
    if args.plot:
        other_impl = next(impl for impl in IMPLEMENTATIONS if impl != args.impl)
        other = train(argparse.Namespace(**{**vars(args), "save": None}), other_impl, distributed=distributed)
        if distributed.is_main:
            plot_loss_curves(args.plot, [run, other])
            steps = min(len(run.losses), len(other.losses))
            gap = max(abs(a - b) for a, b in zip(run.losses[:steps], other.losses[:steps]))
            print(f"{other_impl}: {other.chars_per_second:,.0f} chars/s; largest loss difference over "
                  f"{steps} steps: {gap:.2e}; plot written to {args.plot}")
    return run


if __name__ == "__main__":
    main()
