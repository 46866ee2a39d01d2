"""Training (workflow/rules/train.smk): the loop of one continual pre-training stage and what it is built
from — stage config, sample order, parallel engines, checkpoints, lr schedule, metrics, launcher."""
