"""The partial focal cross-entropy (pfCE): a softmax focal loss averaged over the labelled pixels only.

    pfCE = sum(FL * M) / sum(M),   FL = -alpha (1 - p)^gamma log p,   M = 1 on labelled pixels, else 0

p is the softmax probability of a pixel's true class. gamma > 0 turns down pixels the network already
gets right (p near 1), so the hard ones weigh more; gamma = 0 is plain cross-entropy. alpha here is
one factor for every pixel, not RetinaNet's per-class balance, and Adam all but ignores a constant
factor on the loss (it divides each step by the gradients' own scale): the classes are balanced by
`class_weights` instead (train.py's --class-weights).
"""
import torch.nn.functional as F


def partial_focal_ce(logits, target, ignore_index=255, gamma=2.0, alpha=0.25, class_weights=None):
    """logits (B, C, H, W), target (B, H, W) class indices or ignore_index -> scalar loss.

    Only the labelled pixels are gathered, so the cost grows with the number of labels, not with
    H*W. A batch with no labelled pixel gives 0 (zero gradients, never NaN).
    """
    labelled = target != ignore_index  # (B, H, W), the mask M
    picked = logits.permute(0, 2, 3, 1)[labelled].float()  # (N, C), loss in fp32 even under autocast
    classes = target[labelled].long()  # (N,)
    logp = F.log_softmax(picked, dim=1).gather(1, classes[:, None])[:, 0]  # (N,) log p of the true class
    fl = -alpha * (1 - logp.exp()) ** gamma * logp
    if class_weights is not None:
        fl = fl * class_weights.to(fl.device)[classes]
    # sum over nothing is 0, still attached to the graph; clamp keeps 0/0 from happening
    return fl.sum() / labelled.sum().clamp(min=1)
