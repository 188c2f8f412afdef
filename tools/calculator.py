"""A safe calculator: arithmetic and a few math functions, never arbitrary code.

The expression is parsed with `ast` and walked by a small interpreter that knows
only numbers, arithmetic operators, parentheses and a whitelist of math
functions and constants. Nothing is ever passed to eval/exec, and sizes are
capped so that `9**9**9` or a factorial of a billion fails fast instead of
eating the machine.
"""
# No `from __future__ import annotations`: the agent reads tool annotations as real types.
import ast
import math
import operator
from typing import Callable, Union

Number = Union[int, float]

MAX_EXPRESSION_CHARS = 500
MAX_NESTING = 250          # syntax-tree depth: a 250-term sum, still well under the recursion limit
MAX_INT_BITS = 4_000       # about 1200 decimal digits: plenty, and cheap to compute with
MAX_FACTORIAL_ARG = 1_000


class CalculatorError(ValueError):
    """The expression is not one this calculator accepts or can evaluate."""


def _checked(value: Number) -> Number:
    """Stop runaway integers at every step, not only at the end."""
    if isinstance(value, int) and value.bit_length() > MAX_INT_BITS:
        raise CalculatorError(f"result is too large (more than {MAX_INT_BITS} bits)")
    return value


def _power(base: Number, exponent: Number) -> Number:
    if isinstance(base, int) and isinstance(exponent, int) and exponent >= 0:
        # Estimate the size before computing: 9**9**9 would otherwise run for minutes.
        if base not in (-1, 0, 1) and (base.bit_length() - 1) * exponent > MAX_INT_BITS:
            raise CalculatorError(f"result is too large (more than {MAX_INT_BITS} bits)")
        return base**exponent
    if base == 0 and exponent < 0:
        raise CalculatorError("division by zero (zero to a negative power)")
    try:
        result = float(base) ** float(exponent)
    except OverflowError:
        raise CalculatorError("result is too large") from None
    if isinstance(result, complex):
        raise CalculatorError("result is a complex number (negative base with fractional exponent)")
    return result


def _divide(a: Number, b: Number) -> float:
    if b == 0:
        raise CalculatorError("division by zero")
    return a / b


def _floor_divide(a: Number, b: Number) -> Number:
    if b == 0:
        raise CalculatorError("division by zero")
    return a // b


def _modulo(a: Number, b: Number) -> Number:
    if b == 0:
        raise CalculatorError("modulo by zero")
    return a % b


def _factorial(n: Number) -> int:
    if isinstance(n, float) and n.is_integer():
        n = int(n)
    if not isinstance(n, int) or n < 0:
        raise CalculatorError("factorial needs a non-negative whole number")
    if n > MAX_FACTORIAL_ARG:
        raise CalculatorError(f"factorial argument is too large (max {MAX_FACTORIAL_ARG})")
    return math.factorial(n)


def _log(x: Number, base: Number = math.e) -> float:
    return math.log(x, base)


def _round(x: Number, digits: int = 0) -> Number:
    if not isinstance(digits, int) or abs(digits) > 100:
        # round(5, -10**9) would build 10**(10**9) internally.
        raise CalculatorError("round(x, digits): digits must be a whole number between -100 and 100")
    return round(x, digits) if digits else round(x)


BINARY_OPERATORS: dict[type, Callable[[Number, Number], Number]] = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: _divide,
    ast.FloorDiv: _floor_divide,
    ast.Mod: _modulo,
    ast.Pow: _power,
}

UNARY_OPERATORS: dict[type, Callable[[Number], Number]] = {
    ast.UAdd: operator.pos,
    ast.USub: operator.neg,
}

FUNCTIONS: dict[str, Callable[..., Number]] = {
    "sqrt": math.sqrt, "cbrt": math.cbrt, "exp": math.exp,
    "log": _log, "ln": math.log, "log10": math.log10, "log2": math.log2,
    "sin": math.sin, "cos": math.cos, "tan": math.tan,
    "asin": math.asin, "acos": math.acos, "atan": math.atan, "atan2": math.atan2,
    "sinh": math.sinh, "cosh": math.cosh, "tanh": math.tanh,
    "degrees": math.degrees, "radians": math.radians, "hypot": math.hypot,
    "abs": abs, "round": _round, "floor": math.floor, "ceil": math.ceil, "trunc": math.trunc,
    "factorial": _factorial, "gcd": math.gcd, "lcm": math.lcm, "min": min, "max": max,
}

CONSTANTS: dict[str, float] = {"pi": math.pi, "e": math.e, "tau": math.tau}

# Plain words for the syntax people (and models) most often try.
FORBIDDEN_SYNTAX_NAMES: dict[type, str] = {
    ast.Attribute: "attribute access (x.y)",
    ast.Subscript: "indexing (x[i])",
    ast.Lambda: "lambda",
    ast.Compare: "comparison",
    ast.BoolOp: "and/or",
    ast.NamedExpr: "assignment (:=)",
    ast.IfExp: "if/else",
}


def _evaluate(node: ast.AST, depth: int = 0) -> Number:
    if depth > MAX_NESTING:
        raise CalculatorError("expression is nested too deeply")
    if isinstance(node, ast.Expression):
        return _evaluate(node.body, depth + 1)
    if isinstance(node, ast.Constant):
        # bool is an int subclass; True + True is not arithmetic anyone means.
        if isinstance(node.value, (int, float)) and not isinstance(node.value, bool):
            return node.value
        raise CalculatorError(f"only numbers are allowed, not {node.value!r}")
    if isinstance(node, ast.BinOp):
        if isinstance(node.op, ast.BitXor):
            raise CalculatorError("'^' is not supported; use ** for powers")
        op = BINARY_OPERATORS.get(type(node.op))
        if op is None:
            raise CalculatorError(f"operator {type(node.op).__name__} is not allowed")
        return _checked(op(_evaluate(node.left, depth + 1), _evaluate(node.right, depth + 1)))
    if isinstance(node, ast.UnaryOp):
        op = UNARY_OPERATORS.get(type(node.op))
        if op is None:
            raise CalculatorError(f"operator {type(node.op).__name__} is not allowed")
        return op(_evaluate(node.operand, depth + 1))
    if isinstance(node, ast.Name):
        if node.id in CONSTANTS:
            return CONSTANTS[node.id]
        if node.id in FUNCTIONS:
            raise CalculatorError(f"{node.id} is a function; call it like {node.id}(x)")
        raise CalculatorError(f"unknown name {node.id!r}; known constants: {', '.join(CONSTANTS)}")
    if isinstance(node, ast.Call):
        return _call(node, depth)
    what = FORBIDDEN_SYNTAX_NAMES.get(type(node), type(node).__name__)
    raise CalculatorError(f"{what} is not allowed in a calculation")


def _call(node: ast.Call, depth: int) -> Number:
    if not isinstance(node.func, ast.Name):
        raise CalculatorError("only the named math functions can be called, e.g. sqrt(2)")
    if node.func.id not in FUNCTIONS:
        raise CalculatorError(f"unknown function {node.func.id!r}; known functions: {', '.join(FUNCTIONS)}")
    if node.keywords:
        raise CalculatorError("keyword arguments are not allowed")
    if any(isinstance(arg, ast.Starred) for arg in node.args):
        raise CalculatorError("*args are not allowed")
    args = [_evaluate(arg, depth + 1) for arg in node.args]
    try:
        return _checked(FUNCTIONS[node.func.id](*args))
    except CalculatorError:
        raise
    except TypeError as exc:
        raise CalculatorError(f"wrong arguments for {node.func.id}(): {exc}") from None


def _format(value: Number) -> str:
    if isinstance(value, int):
        return str(_checked(value))
    if math.isnan(value):
        raise CalculatorError("result is not a number")
    if math.isinf(value):
        raise CalculatorError("result is too large")
    if value.is_integer() and abs(value) < 1e15:
        return str(int(value))
    # 15 significant digits hides binary noise: 0.1 + 0.2 shows as 0.3.
    return f"{value:.15g}"


def calculate(expression: str) -> str:
    """Evaluate an arithmetic expression like a calculator, e.g. "2 * (3 + 4) ** 2".
    Supports + - * / // % ** and parentheses, the constants pi, e and tau, and math
    functions such as sqrt, log(x, base), log10, exp, sin/cos/tan (radians), abs, round,
    floor, ceil and factorial.

    All functions: sqrt, cbrt, exp, log(x[, base]), ln, log10, log2, sin, cos, tan, asin,
    acos, atan, atan2, sinh, cosh, tanh, degrees, radians, hypot, abs, round(x[, digits]),
    floor, ceil, trunc, factorial, gcd, lcm, min and max.

    Args:
        expression: The arithmetic expression to evaluate, written in Python syntax (use ** for powers).

    Returns:
        The result as text.
    """
    if not isinstance(expression, str):
        raise CalculatorError("expression must be a string")
    expression = expression.strip()
    if not expression:
        raise CalculatorError("expression is empty")
    if len(expression) > MAX_EXPRESSION_CHARS:
        raise CalculatorError(f"expression is too long (max {MAX_EXPRESSION_CHARS} characters)")
    try:
        tree = ast.parse(expression, mode="eval")
    except SyntaxError as exc:
        raise CalculatorError(f"not a valid expression: {exc.msg}") from None
    except (RecursionError, MemoryError):
        raise CalculatorError("expression is nested too deeply") from None
    try:
        return _format(_evaluate(tree))
    except CalculatorError:
        raise
    except ZeroDivisionError:
        raise CalculatorError("division by zero") from None
    except OverflowError:
        raise CalculatorError("result is too large") from None
    except RecursionError:
        raise CalculatorError("expression is nested too deeply") from None
    except ValueError as exc:
        raise CalculatorError(f"math error: {exc}") from None
