"""SymPy helpers shared by the book's derivations.

The chapters derive their formulas with SymPy: they write Gaussian densities, integrate them
over the real line, compare two positive expressions and typeset the results. These helpers
do exactly that and nothing more, so that a derivation in a notebook reads as the mathematics
it carries out:

==========================  ==================================================================
``normal_pdf``              the density N(x; mean, var), with ``var`` the *variance*
``log_normal_pdf``          log N(x; mean, var) with the logarithm expanded (a quadratic in x)
``gaussian_integral``       the integral over the real line of "polynomial x exp(quadratic)"
``tidy``                    expand products and logarithms, so that equal expressions look equal
``log_ratio``               log(f / g) simplified: 0 exactly when positive f and g are equal
``equation_latex``, ``show``  typeset ``lhs = expr`` (``show`` displays it in a notebook)
==========================  ==================================================================

Only SymPy is needed to import this module; ``show`` imports IPython when it is called.
"""

from __future__ import annotations

import sympy as sp

__all__ = ["normal_pdf", "log_normal_pdf", "gaussian_integral", "tidy", "log_ratio", "equation_latex", "show"]


def normal_pdf(x, mean, var):
    r"""The Gaussian density :math:`\mathcal N(x; \mu, v) = (2\pi v)^{-1/2} \exp(-(x - \mu)^2 / 2v)`.

    ``var`` is the variance ``v``, not the standard deviation. All arguments may be SymPy
    expressions or numbers; the result is a SymPy expression.
    """
    return sp.exp(-((x - mean) ** 2) / (2 * var)) / sp.sqrt(2 * sp.pi * var)


def log_normal_pdf(x, mean, var):
    r""":math:`\log \mathcal N(x; \mu, v)` with the logarithm expanded: a quadratic polynomial in ``x``."""
    return sp.expand(sp.expand_log(sp.log(normal_pdf(x, mean, var)), force=True))


def gaussian_integral(expr, var):
    r""":math:`\int_{-\infty}^{\infty} \mathrm{expr}\, d\,\mathrm{var}`, in the form SymPy integrates best.

    The integrand is expanded and its exponentials merged, so that SymPy sees "polynomial times
    exp(quadratic)", the form its Gaussian-integral rules recognise. Convergence conditions are
    not returned (``conds="none"``): the callers integrate densities whose variances are
    positive symbols, for which the integrals converge.
    """
    integrand = sp.powsimp(sp.expand(expr), combine="exp")
    return sp.integrate(integrand, (var, -sp.oo, sp.oo), conds="none")


def tidy(expr):
    """Expand products and logarithms (``force=True``), so that equal expressions look equal."""
    return sp.expand(sp.expand_log(expr, force=True))


def log_ratio(f, g, *, split: bool = False):
    """``log(f / g)``, simplified: it is 0 exactly when the positive expressions ``f`` and ``g`` are equal.

    By default the quotient ``f / g`` is simplified first and its logarithm expanded. With
    ``split=True`` the two logarithms are expanded separately and subtracted,
    ``log f - log g``. That route avoids simplifying the quotient, which helps when SymPy would
    rewrite a square root such as ``sqrt(1 - abar)`` into a form it cannot cancel because it
    does not know that ``abar < 1`` (chapter 3 needs it).
    """
    if split:
        return sp.simplify(sp.expand_log(sp.log(f), force=True) - sp.expand_log(sp.log(g), force=True))
    return sp.simplify(sp.expand_log(sp.log(sp.simplify(f / g)), force=True))


def equation_latex(lhs: str, expr, suffix: str = "", *, factor_exponents: bool = True) -> str:
    """The LaTeX string ``"lhs = <expr>suffix"``; ``lhs`` and ``suffix`` are LaTeX already.

    With ``factor_exponents`` (the default) the argument of every ``exp`` is factored, which
    shows the exponent of a Gaussian density as a single fraction.
    """
    expr = sp.sympify(expr)
    if factor_exponents:
        expr = expr.replace(sp.exp, lambda arg: sp.exp(sp.factor(arg)))
    return f"{lhs} = {sp.latex(expr)}{suffix}"


def show(lhs: str, expr, suffix: str = "", *, factor_exponents: bool = True) -> None:
    """Display the labelled equation ``lhs = expr`` as typeset math in a notebook (``IPython.display.Math``).

    ``lhs`` is LaTeX (e.g. ``r"\\E[x_t]"``), ``expr`` a SymPy expression and ``suffix`` optional
    LaTeX appended after it. Returns nothing, so that a cell ending in ``show(...)`` shows the
    equation only. See :func:`equation_latex` for the string itself.
    """
    from IPython.display import Math, display  # the book's tooling; not needed to import this module

    display(Math(equation_latex(lhs, expr, suffix, factor_exponents=factor_exponents)))
