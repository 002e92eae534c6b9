"""Variance components of a fitness landscape, and what they imply for a search (pure functions).

The probe (`mirrorlab.probe`) scores P points of a search space on the same S inner seeds (common
random numbers: the same seed fixes prompt order, sampling and the validation subset for every
point). One evaluation y_ps then follows the two-way random-effects model

    y_ps = mu + a_p + b_s + e_ps,   a_p ~ (0, signal_var), b_s ~ (0, seed_main_var), e_ps ~ (0, noise_var)

where a_p is what a search can find (between-point signal), b_s is the part of a seed's luck that
every point shares (removed by common random numbers or by pairing with a baseline on the same
seed) and e_ps is the noise that separates two points on one seed: training-seed noise plus the
part of the validation sampling noise the points do not share (`eval_var`, estimated from
per-problem scores as the point x problem interaction). The estimates are the ANOVA (method of
moments) ones; confidence intervals are exact for noise_var (chi-square) and for the intraclass
correlation (F), and the modified-large-sample interval of Ting et al. (1990) for signal_var, a
difference of mean squares (Burdick and Graybill 1992, section 3.1).

`plan_*` turn the components into decisions: inner seeds per candidate to tell apart two points
d apart with given power, and the expected true gain of keeping the best of N random draws scored
on k seeds (order statistics of the signal, shrunk by the reliability of a k-seed score).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from scipy import integrate, stats


@dataclass(frozen=True)
class Anova:
    """Mean squares and degrees of freedom of a complete points x seeds table (no replication)."""

    n_points: int
    n_seeds: int
    grand_mean: float
    ms_points: float
    ms_seeds: float
    ms_resid: float
    df_points: int
    df_seeds: int
    df_resid: int


def two_way_anova(y: np.ndarray) -> Anova:
    """The two-way ANOVA without replication of `y[point, seed]` (every cell present)."""
    y = np.asarray(y, dtype=np.float64)
    if y.ndim != 2 or y.shape[0] < 2 or y.shape[1] < 2:
        raise ValueError(f"need a points x seeds table with at least 2 of each, got shape {y.shape}")
    if not np.all(np.isfinite(y)):
        raise ValueError("the table has missing or non-finite cells; drop failed points first")
    P, S = y.shape
    m = y.mean()
    rp, cs = y.mean(1), y.mean(0)
    resid = y - rp[:, None] - cs[None, :] + m
    dfp, dfs, dfe = P - 1, S - 1, (P - 1) * (S - 1)
    return Anova(
        P,
        S,
        float(m),
        float(S * np.sum((rp - m) ** 2) / dfp),
        float(P * np.sum((cs - m) ** 2) / dfs),
        float(np.sum(resid**2) / dfe),
        dfp,
        dfs,
        dfe,
    )


def interaction_var(scores: np.ndarray) -> float:
    """Validation-sampling noise of one evaluation that the points do not share.

    `scores[point, problem]`: per-problem scores of every point on one seed's (common) problems.
    The point x problem interaction mean square divided by the number of problems is the variance
    that problem sampling adds to the difference of two points' means (half of it per point), i.e.
    what pairing on the same problems cannot remove."""
    x = np.asarray(scores, dtype=np.float64)
    P, n = x.shape
    if P < 2 or n < 2:
        return float("nan")
    r = x - x.mean(1, keepdims=True) - x.mean(0, keepdims=True) + x.mean()
    return float(np.sum(r**2) / ((P - 1) * (n - 1)) / n)


def mls_difference_interval(
    c1: float, ms1: float, df1: int, c2: float, ms2: float, df2: int, alpha: float = 0.05
) -> tuple[float, float]:
    """Two-sided 1 - alpha interval of theta = c1 E[ms1] - c2 E[ms2] (c1, c2 > 0; ms_i with df_i
    chi-square degrees of freedom, independent): Ting et al.'s modified large-sample method. The
    bounds are not clipped (a variance's lower bound below 0 reads "0 is plausible")."""
    a = alpha / 2
    f_hi = lambda q, d1, d2: stats.f.ppf(1 - q, d1, d2)  # noqa: E731 - upper q point
    chi_up = lambda q, d: stats.chi2.ppf(1 - q, d) / d  # noqa: E731 - F(q; d, inf)
    chi_lo = lambda q, d: stats.chi2.ppf(q, d) / d  # noqa: E731 - F(1 - q; d, inf)
    G1, G2 = 1 - 1 / chi_up(a, df1), 1 - 1 / chi_up(a, df2)
    H1, H2 = 1 / chi_lo(a, df1) - 1, 1 / chi_lo(a, df2) - 1
    F12a, F12b = f_hi(a, df1, df2), f_hi(1 - a, df1, df2)
    G12 = ((F12a - 1) ** 2 - G1**2 * F12a**2 - H2**2) / F12a
    H12 = ((1 - F12b) ** 2 - H1**2 * F12b**2 - G2**2) / F12b
    t1, t2 = c1 * ms1, c2 * ms2
    est = t1 - t2
    vl = G1**2 * t1**2 + H2**2 * t2**2 + G12 * t1 * t2
    vu = H1**2 * t1**2 + G2**2 * t2**2 + H12 * t1 * t2
    return float(est - math.sqrt(max(vl, 0.0))), float(est + math.sqrt(max(vu, 0.0)))


@dataclass(frozen=True)
class Components:
    """Variance components of one fitness (see the module docstring); *_ci are (low, high)."""

    n_points: int
    n_seeds: int
    mean: float
    signal_var: float
    signal_var_ci: tuple[float, float]
    noise_var: float  # e_ps: one evaluation's noise against its point's mean, seeds shared
    noise_var_ci: tuple[float, float]
    seed_main_var: float  # shared by all points of a seed (removed by CRN or pairing)
    eval_var: float | None  # the unshared validation-sampling part of noise_var (None: unknown)
    icc: float  # signal_var / (signal_var + noise_var): reliability of one evaluation
    icc_ci: tuple[float, float]
    f_points: float
    p_points: float  # F test of "all points equal"
    alpha: float

    @property
    def signal_sd(self) -> float:
        return math.sqrt(max(self.signal_var, 0.0))

    @property
    def noise_sd(self) -> float:
        return math.sqrt(max(self.noise_var, 0.0))

    @property
    def eval_sd(self) -> float | None:
        return None if self.eval_var is None else math.sqrt(max(self.eval_var, 0.0))

    @property
    def seed_sd(self) -> float:
        """Training-seed noise that the points do not share: noise_var minus its eval part."""
        return math.sqrt(max(self.noise_var - (self.eval_var or 0.0), 0.0))

    def to_dict(self) -> dict[str, Any]:
        """JSON-able, with the standard deviations beside the variances."""
        d = asdict(self)
        d.update(
            signal_sd=self.signal_sd,
            noise_sd=self.noise_sd,
            eval_sd=self.eval_sd,
            seed_sd=self.seed_sd,
            seed_main_sd=math.sqrt(max(self.seed_main_var, 0.0)),
            signal_sd_ci=[math.sqrt(max(v, 0.0)) for v in self.signal_var_ci],
            noise_sd_ci=[math.sqrt(max(v, 0.0)) for v in self.noise_var_ci],
        )
        return d


def variance_components(y: np.ndarray, eval_var: float | None = None, alpha: float = 0.05) -> Components:
    """ANOVA estimates and intervals of the components of `y[point, seed]` (complete table).

    Negative moment estimates are clipped to 0 (their interval says how far below 0 the data
    allow); `eval_var`, when known (from `interaction_var`), splits noise_var into training-seed
    and validation-sampling parts."""
    a = two_way_anova(y)
    S, P = a.n_seeds, a.n_points
    signal = (a.ms_points - a.ms_resid) / S
    lo, hi = mls_difference_interval(1 / S, a.ms_points, a.df_points, 1 / S, a.ms_resid, a.df_resid, alpha)
    noise_ci = (
        a.df_resid * a.ms_resid / stats.chi2.ppf(1 - alpha / 2, a.df_resid),
        a.df_resid * a.ms_resid / stats.chi2.ppf(alpha / 2, a.df_resid),
    )
    if a.ms_points == 0 and a.ms_resid == 0:  # a constant table: nothing to decompose
        nan = float("nan")
        return Components(P, S, a.grand_mean, 0.0, (nan, nan), 0.0, (0.0, 0.0),
                          max(a.ms_seeds / P, 0.0), eval_var, 0.0, (nan, nan), nan, nan, alpha)
    F = a.ms_points / a.ms_resid if a.ms_resid > 0 else math.inf
    p = float(stats.f.sf(F, a.df_points, a.df_resid)) if math.isfinite(F) else 0.0
    if math.isfinite(F):  # exact F interval of the consistency ICC (McGraw and Wong 1996, case 3)
        FL = F / stats.f.ppf(1 - alpha / 2, a.df_points, a.df_resid)
        FU = F * stats.f.ppf(1 - alpha / 2, a.df_resid, a.df_points)
        icc_ci = ((FL - 1) / (FL + S - 1), (FU - 1) / (FU + S - 1))
    else:
        icc_ci = (1.0, 1.0)
    sig = max(signal, 0.0)
    icc = sig / (sig + a.ms_resid) if sig + a.ms_resid > 0 else 0.0
    return Components(
        P,
        S,
        a.grand_mean,
        sig,
        (lo, hi),
        a.ms_resid,
        noise_ci,
        max((a.ms_seeds - a.ms_resid) / P, 0.0),
        eval_var,
        icc,
        icc_ci,
        F,
        p,
        alpha,
    )


# --------------------------------------------------------------------------- planning
def seeds_for_difference(noise_var: float, d: float, power: float = 0.8, alpha: float = 0.05) -> int:
    """Inner seeds per point so that a paired (same seeds) two-sided z test at `alpha` detects a
    true difference `d` between two points with probability `power`: k = 2 (z_a/2 + z_b)^2 s^2 / d^2."""
    if d <= 0:
        raise ValueError("d must be > 0")
    z = stats.norm.ppf(1 - alpha / 2) + stats.norm.ppf(power)
    return max(1, math.ceil(2 * z**2 * max(noise_var, 0.0) / d**2))


def detectable_difference(noise_var: float, k: int, power: float = 0.8, alpha: float = 0.05) -> float:
    """The smallest true difference two points scored on k shared seeds are told apart by with
    `power` (inverse of `seeds_for_difference`)."""
    z = stats.norm.ppf(1 - alpha / 2) + stats.norm.ppf(power)
    return float(z * math.sqrt(2 * max(noise_var, 0.0) / max(k, 1)))


def expected_max_normal(n: int) -> float:
    """E[max of n independent standard normals] (0 for n = 1), by quadrature."""
    if n <= 1:
        return 0.0
    f = lambda x: x * n * stats.norm.pdf(x) * stats.norm.cdf(x) ** (n - 1)  # noqa: E731
    return float(integrate.quad(f, -12, 12, limit=200)[0])


def selection_gain(signal_var: float, noise_var: float, n: int, k: int) -> float:
    """Expected true gain over a random draw of keeping the best of n random draws, each scored
    as the mean of k seeds: signal_sd * reliability^(1/2) * E[max of n], where reliability =
    signal_var / (signal_var + noise_var / k) (order statistics of a bivariate normal)."""
    s = max(signal_var, 0.0)
    if s == 0.0:
        return 0.0
    rel = s / (s + max(noise_var, 0.0) / max(k, 1))
    return math.sqrt(s) * math.sqrt(rel) * expected_max_normal(n)


def plan(
    c: Components,
    budgets: list[int],
    differences: list[float],
    val_scale: list[float],
    power: float = 0.8,
    alpha: float = 0.05,
    confirm_seeds: int = 3,
) -> dict[str, Any]:
    """What the components imply: per difference d and validation-set multiplier m (m x the
    probed problems: only the eval part of the noise shrinks), the seeds per candidate for `power`;
    per budget B (inner runs), the best split into n draws x k seeds for best-of-n random search,
    its expected gain and the gain an oracle would get from n = B draws; and the smallest
    difference the confirmation stage (`confirm_seeds` seeds, paired) can detect."""
    ev = c.eval_var or 0.0
    seed_only = max(c.noise_var - ev, 0.0)
    rows = []
    for d in differences:
        for m in val_scale:
            nv = seed_only + ev / m
            rows.append(
                {
                    "difference": d,
                    "val_multiplier": m,
                    "noise_sd": math.sqrt(nv),
                    "seeds_per_candidate": seeds_for_difference(nv, d, power, alpha),
                }
            )
    best_of = []
    for B in budgets:
        opts = [
            (selection_gain(c.signal_var, c.noise_var, B // k, k), k) for k in range(1, B + 1) if B // k >= 1
        ]
        g, k = max(opts)
        best_of.append(
            {
                "budget_runs": B,
                "seeds_per_draw": k,
                "draws": B // k,
                "expected_gain": g,
                "oracle_gain": selection_gain(c.signal_var, 0.0, B, 1),
            }
        )
    mde = detectable_difference(c.noise_var, confirm_seeds, power, alpha)
    top = best_of[-1]["expected_gain"] if best_of else 0.0
    verdict = (
        "searchable: the best of the largest budget is expected to beat a random draw by more "
        "than the confirmation stage can detect"
        if top > mde
        else "not searchable at these budgets: the expected gain of the best draw is below what the "
        "confirmation stage can detect; cut the noise (seeds, problems) or change the space"
    )
    return {
        "power": power,
        "alpha": alpha,
        "seeds_for_difference": rows,
        "best_of_n": best_of,
        "confirm_seeds": confirm_seeds,
        "confirm_detectable_difference": mde,
        "verdict": verdict,
    }


def paired_t_power(effect: float, sd: float, n: int, alpha: float = 0.05) -> float:
    """Power of a two-sided paired t test with n pairs whose differences have mean `effect` and
    standard deviation `sd` (noncentral t)."""
    if n < 2 or sd <= 0:
        return float("nan")
    df = n - 1
    t = stats.t.ppf(1 - alpha / 2, df)
    nc = effect / (sd / math.sqrt(n))
    return float(stats.nct.sf(t, df, nc) + stats.nct.cdf(-t, df, nc))


def search_vs_random_prediction(
    c: Components,
    budget: int,
    search_seeds: int,
    test_seeds: int,
    optimum_draws: int = 64,
    alpha: float = 0.05,
    rank_noise_var: float | None = None,
) -> dict[str, Any]:
    """An optimistic bound on the power of `benchmarks/search_vs_random.py` to show a search beating
    random: random keeps the best of `budget` single-seed draws (expected gain `selection_gain`,
    ranked under `rank_noise_var`: default 2 x noise_var, the worst case of draws spread over
    generations on different seeds, each paired against its own seed's baseline run, which makes
    random's pick as poor as it plausibly gets); the search is granted the space's optimum, taken as
    the noise-free best of `optimum_draws` draws (a search cannot beat the optimum; 64 draws of a
    normal reach 2.34 sd); each answer is scored on `test_seeds` fresh training seeds, so a paired
    difference carries at least 2 noise_var / test_seeds (the spread of random's own pick across
    search seeds is left out). Each choice flatters the search: power below 80% here means no
    strategy can be predicted to win."""
    rnv = 2 * max(c.noise_var, 0.0) if rank_noise_var is None else rank_noise_var
    rand = selection_gain(c.signal_var, rnv, budget, 1)
    best = selection_gain(c.signal_var, 0.0, optimum_draws, 1)
    effect = max(best - rand, 0.0)
    sd = math.sqrt(2 * max(c.noise_var, 0.0) / max(test_seeds, 1))
    power = paired_t_power(effect, sd, search_seeds, alpha) if effect > 0 else 0.0
    need = next(
        (n for n in range(2, 10_001) if effect > 0 and paired_t_power(effect, sd, n, alpha) >= 0.8), None
    )
    return {
        "budget_runs": budget,
        "random_expected_gain": rand,
        "optimum_gain": best,
        "max_effect": effect,
        "diff_sd_lower_bound": sd,
        "search_seeds": search_seeds,
        "test_seeds": test_seeds,
        "power_upper_bound": power,
        "search_seeds_for_80pct": need,
        "predicted_positive": bool(power >= 0.8),
    }
