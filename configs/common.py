"""Config blocks every jaxft config shares: optimizer, mesh, sharding rules, early stopping,
PEFT."""

import ml_collections

from jaxft.data.assets import minilm_dir  # noqa: F401 (configs' default init_from)

# Logical axis -> mesh axes. Parameters: vocab, embed, heads, kv, mlp. Activations: batch,
# length, act_*. The one place where sharding is decided.
AXIS_RULES = (
    ("batch", ("data", "fsdp")),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("mlp", "tensor"),
    ("kv", None),
    ("layers", None),  # the leading axis of params stacked by config.model.scan_layers
    ("length", None),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_mlp", "tensor"),
    ("act_vocab", "tensor"),
)


def optimizer(**overrides) -> ml_collections.ConfigDict:
  """AdamW with warmup, a cosine or linear schedule and gradient clipping (jaxft/run/optim.py)."""
  o = ml_collections.ConfigDict()
  o.lr = 6e-4  # peak learning rate after warmup
  o.schedule = "cosine"  # "cosine" (to lr * min_lr_ratio) or "linear" (BERT's: to 0)
  o.warmup_steps = 2000  # linear warmup from 0; 0 = warmup_fraction of num_steps
  o.warmup_fraction = 0.0
  o.min_lr_ratio = 0.1  # cosine only: final lr = lr * min_lr_ratio at num_steps
  o.b1 = 0.9
  o.b2 = 0.95
  o.eps = 1e-8
  o.weight_decay = 0.1  # decoupled (AdamW); applied to matmul kernels only by default
  o.decay_embeddings = False  # also decay the token/position embeddings
  o.decay_norms_and_biases = False  # also decay LayerNorm params and biases
  o.clip_norm = 1.0  # global-norm gradient clipping; 0 disables
  o.update(overrides)
  return o


def mesh() -> ml_collections.ConfigDict:
  """Device mesh (jaxft/parallel/sharding.py): data x fsdp x tensor inside one slice, times
  dcn_data x dcn_fsdp x dcn_tensor slices; the product of all six = number of devices."""
  m = ml_collections.ConfigDict()
  # Layout inside one slice (ICI: a TPU slice, or one host's GPUs); -1 = the remaining devices
  # of one slice. With a single slice (all dcn_* = 1) these are the whole mesh.
  m.data = -1
  m.fsdp = 1
  m.tensor = 1
  # How many slices each axis spans (TPU multi-slice, over the data-center network; on CPU/GPU
  # each process counts as a slice). The total size of axis X is X * dcn_X, and dcn_data *
  # dcn_fsdp * dcn_tensor must equal the number of slices. Typical multi-slice: dcn_data = the
  # number of slices (pure data parallelism across slices), fsdp/tensor inside each slice.
  m.dcn_data = 1
  m.dcn_fsdp = 1
  m.dcn_tensor = 1
  return m


def early_stopping() -> ml_collections.ConfigDict:
  """Stop when the validation metric has not improved for `patience` evaluations. Every
  improvement saves the params to workdir/best, which reports, evaluate, predict and export use."""
  e = ml_collections.ConfigDict()
  e.metric = ""  # "" = the task's (loss; mlm_accuracy; accuracy; entity / SQuAD f1)
  e.mode = ""  # "max" | "min"; "" = the task's
  e.patience = 0  # evaluations without improvement before stopping; 0 = never
  return e


def peft(**overrides) -> ml_collections.ConfigDict:
  """Parameter-efficient fine-tuning (jaxft/peft/): which method, where, and its sizes."""
  p = ml_collections.ConfigDict()
  p.method = "none"  # none (full fine-tuning) | lora | adalora | adapter | prefix | prompt
  # Regex searched in module paths ("bert/layer_0/attn/query", "transformer/h_3/mlp/fc");
  # "" = the method's default: lora/adalora 'attn/(query|value)$', adapter 'attn/out$|mlp/proj$'.
  p.targets = ""
  p.trainable = ""  # regex of base params trained too (the task head always is), e.g. 'pooler'
  # Peak learning rate of a PEFT run (replaces config.optim.lr); 0 = the method's default:
  # lora/adalora/adapter 1e-3, prefix 5e-3, prompt 3e-2.
  p.lr = 0.0
  p.rank = 8  # LoRA rank; AdaLoRA: the average rank left after reallocation
  p.alpha = 16.0  # LoRA/AdaLoRA update scale: alpha / rank (AdaLoRA: alpha / init_rank)
  p.dropout = 0.05  # LoRA/AdaLoRA dropout on the adapted layer's input
  # A Hugging Face PEFT LoRA adapter directory whose weights start this run's LoRA (and its
  # modules_to_save head); its r / lora_alpha must equal rank / alpha, its modules targets'.
  p.init_adapter = ""
  p.init_rank = 12  # AdaLoRA: rank every module starts with
  p.warmup_fraction = 0.1  # AdaLoRA: steps before the budget starts falling (t_init)
  p.final_fraction = 0.3  # AdaLoRA: last steps at the final budget, mask fixed (t_final)
  p.mask_every = 10  # AdaLoRA: steps between reallocations (delta T)
  p.beta1 = 0.85  # AdaLoRA: EMA of sensitivity |w * grad|
  p.beta2 = 0.85  # AdaLoRA: EMA of its uncertainty
  p.orth_reg = 0.1  # AdaLoRA: weight of the P/Q orthogonality penalty
  p.adapter_size = 64  # adapter bottleneck width
  p.num_virtual_tokens = 20  # prefix / prompt length
  p.prefix_projection = 0  # prefix: hidden size of the MLP reparameterisation; 0 = direct
  p.update(overrides)
  return p


def adversarial(**overrides) -> ml_collections.ConfigDict:
  """Adversarial training on the token embeddings (jaxft/run/adversarial.py): each example's
  perturbation lies in an L2 ball of radius epsilon over its row's T x D embedding entries."""
  a = ml_collections.ConfigDict()
  a.method = "none"  # "none" | "fgm" | "pgd" | "freelb"
  a.epsilon = 1.0  # L2 radius per example
  a.steps = 3  # pgd / freelb: ascent steps (pgd: steps + 1 passes a step; freelb: steps)
  a.step_size = 0.5  # pgd / freelb: the L2 length of each ascent step
  a.init = 0.0  # freelb: start uniform in [-init, init] / sqrt(T * D) per entry
  a.weight = 1.0  # fgm / pgd: loss = clean + weight * perturbed
  a.update(overrides)
  return a


def distill(**overrides) -> ml_collections.ConfigDict:
  """Knowledge distillation (jaxft/run/distill.py, docs/distillation.md): the loss becomes
  alpha * CE + (1 - alpha) * T^2 * KL(teacher_T || student_T) over the task's distributions."""
  d = ml_collections.ConfigDict()
  d.teacher = ""  # a jaxft workdir or Hugging Face directory: same tokenizer and label set
  d.ema_decay = 0.0  # > 0 (e.g. 0.999): self-distillation from the student's moving average
  d.alpha = 0.5  # weight of the labels' cross-entropy; 1 - alpha weighs the teacher's KL
  d.temperature = 2.0  # softens both distributions; the KL is scaled by T^2
  d.cache = False  # teacher logits of the training rows computed once, saved in the workdir
  d.update(overrides)
  return d


def augment() -> ml_collections.ConfigDict:
  """Training-time text augmentation (jaxft/data/augment.py, docs/augmentation.md): EDA's
  synonym replacement, random insertion, swap and deletion on the training split only, seeded
  per (seed, epoch, example); classification and NER (entity words are never touched)."""
  a = ml_collections.ConfigDict()
  a.method = "none"  # "none" | "eda"
  a.ops = "sr,ri,rs,rd"  # EDA operations; each augmented copy gets one, drawn uniformly
  a.alpha_sr = 0.1  # synonym replacement: fraction of the words replaced
  a.alpha_ri = 0.1  # random insertion: synonyms inserted, as a fraction of the words
  a.alpha_rs = 0.1  # random swap: swaps, as a fraction of the words
  a.alpha_rd = 0.1  # random deletion: each word's probability of being deleted
  a.num_aug = 0  # augmented copies per example per epoch (with the original); 0 = use p
  a.p = 0.5  # num_aug=0: each example is replaced by an augmented copy with this probability
  a.seed = 0  # added to config.data.shuffle_seed for the augmentation's random draws
  return a


def continual() -> ml_collections.ConfigDict:
  """Continual learning (docs/continual-learning.md; python -m jaxft.continual sets these per
  stage): the EWC penalty of earlier stages and experience replay from their examples."""
  c = ml_collections.ConfigDict()
  # EWC: an .npz jaxft/run/ewc.py saved (the diagonal Fisher of earlier stages and the params
  # they ended with); "" = no penalty. loss += ewc_weight / 2 * sum F (theta - anchor)^2.
  c.ewc_file = ""
  c.ewc_weight = 0.0
  # Replay: a buffer (JSONL of raw examples, jaxft/data/replay.py) of earlier stages' training
  # examples; replay_ratio of each epoch's examples come from it (0 = none).
  c.replay_file = ""
  c.replay_ratio = 0.0
  return c
