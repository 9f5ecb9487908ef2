"""Plain, independent implementations of algorithm.md for the tests.

Written line by line from the specification with numpy and Python loops; they share no code
with casa_core, so agreement with casa_core means something.
"""
from __future__ import annotations

from collections import deque

import numpy as np


def plain_k(s, square, energy):
    if not square:
        return len(s)
    e = [float(x) ** 2 for x in s]
    total = sum(e)
    acc = 0.0
    for i, v in enumerate(e):
        acc += v
        if acc / total >= energy:
            return i + 1
    return len(s)


def plain_components(adj):
    n = len(adj)
    label = [-1] * n
    nxt = 0
    for start in range(n):
        if label[start] >= 0:
            continue
        label[start] = nxt
        queue = deque([start])
        while queue:
            a = queue.popleft()
            for b in range(n):
                if adj[a][b] and label[b] < 0:
                    label[b] = nxt
                    queue.append(b)
        nxt += 1
    return np.array(label), nxt


def plain_casa(cl, cf, s, square, tau, q_dom, q_act, energy, restore=True, arbitrate=True):
    cl = np.asarray(cl, dtype=np.float64)
    cf = np.asarray(cf, dtype=np.float64)
    s = np.asarray(s, dtype=np.float64)
    rows, cols = cl.shape
    k = plain_k(s, square, energy)
    adj = [[False] * k for _ in range(k)]
    for i in range(k):
        for j in range(k):
            if i != j and abs(cl[i, j]) / (abs(s[i] - s[j]) + 1e-6) > tau:
                adj[i][j] = adj[j][i] = True
    labels, m = plain_components(adj)
    members = [np.nonzero(labels == c)[0] for c in range(m)]
    ck = cf[:k, :k]
    rho_r = np.array([np.mean([np.linalg.norm(ck[i, :]) for i in g]) for g in members])
    rho_s = np.array([np.mean([np.linalg.norm(ck[:, j]) for j in g]) for g in members])
    dom_r = rho_r >= np.quantile(rho_r, q_dom)
    dom_s = rho_s >= np.quantile(rho_s, q_dom)
    D = np.zeros((rows, cols), dtype=bool)
    for i in range(k):
        if dom_r[labels[i]]:
            D[i, :] = True
    for j in range(k):
        if dom_s[labels[j]]:
            D[:, j] = True
    cos = np.zeros((m, m))
    for a in range(m):
        for b in range(m):
            bl = cl[np.ix_(members[a], members[b])]
            bf = cf[np.ix_(members[a], members[b])]
            cos[a, b] = (bl * bf).sum() / (np.linalg.norm(bl) * np.linalg.norm(bf) + 1e-8)
    new = np.where(D, cl, cl - cf if restore else cl)
    arb = np.zeros_like(D)
    score, thr = None, None
    if arbitrate:
        score = np.abs(cl * cf)
        for i in range(rows):
            for j in range(cols):
                if i < k and j < k:
                    score[i, j] *= cos[labels[i], labels[j]]
        cand = D & (np.sign(cl) == np.sign(cf))
        if cand.any():
            thr = np.quantile(score[cand], q_act)
            arb = cand & (score > thr)
            for i, j in zip(*np.nonzero(arb)):
                new[i, j] = cl[i, j] - cf[i, j] if abs(cl[i, j]) > abs(cf[i, j]) else 0.0
    return new, dict(k=k, labels=labels, D=D, arb=arb, score=score, thr=thr)


