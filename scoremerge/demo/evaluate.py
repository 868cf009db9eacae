"""Evaluation: logits and accuracy of a state dict on a split, and the logit ensemble."""
import torch
from torch.func import functional_call

_EVAL_BATCH = 1024


@torch.inference_mode()
def logits(model, state, x):
    """model's logits [N, C] on images x with its parameters and buffers taken from `state`."""
    model.eval()
    return torch.cat([functional_call(model, state, (x[i:i + _EVAL_BATCH],))
                      for i in range(0, len(x), _EVAL_BATCH)])


def accuracy_of_logits(z, y):
    return (z.argmax(dim=1) == y).float().mean().item()


def accuracy(model, state, split):
    return accuracy_of_logits(logits(model, state, split.x), split.y)


def ensemble_accuracy(model, states, split):
    """Accuracy of the mean of the models' logits: K forward passes, not one merged model."""
    mean_logits = torch.stack([logits(model, s, split.x) for s in states]).mean(dim=0)
    return accuracy_of_logits(mean_logits, split.y)
