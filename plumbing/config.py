"""A script's configuration: its constants with the command line's `--name=value` overrides, nanoGPT style,
checked against the range each constant's comment opens with, `--help` built from those comments, and a
training script's configuration resolved once (resolve) for its run."""
import math
import operator
import os
import re
import sys
import tokenize
from dataclasses import dataclass

from plumbing.celeba import celeba_folder
from plumbing.console import fail


def constant_names(namespace):
    """The script's constants: its module-level int, float, bool and str names that start lower-case.

    Upper-case names (MODEL, N_CLASSES) are fixed facts of the experiment, not knobs.
    """
    return [name for name, value in namespace.items()
            if name[0].islower() and type(value) in (int, float, bool, str)]


def constant_help(source_path):
    """Map each `name = value  # comment` line of a script to its comment, for --help."""
    help_of = {}
    with tokenize.open(source_path) as f:
        for token in tokenize.generate_tokens(f.readline):
            line = token.line
            if token.type == tokenize.COMMENT and line[:1].isalpha() and '=' in line:
                help_of[line.split('=', 1)[0].strip()] = token.string.lstrip('# ').strip()
    return help_of


# The range a constant's comment opens with, before ': ' and its meaning (see constant_range).
_NUMBER = r'-?\d+(?:\.\d*)?(?:e-?\d+)?'
_BOUND = re.compile(rf'(>=|<=|>|<) ?({_NUMBER})$')
_INTERVAL = re.compile(rf'([\[(])({_NUMBER}), ({_NUMBER})([\])])$')
_CHOICES = re.compile(r'\{(.+)\}$')
_VALUE = re.compile(rf'{_NUMBER}$')
_COMPARE = {'>': operator.gt, '>=': operator.ge, '<': operator.lt, '<=': operator.le,
            '[': operator.ge, '(': operator.gt, ']': operator.le, ')': operator.lt}


class Range:
    """The values a constant allows, parsed from the opening of its comment:

        > 0    >= 1    < 1    [0, 1)    (0, 1]    {auto, bf16}    non-empty    0 or [2, 100000]    [2, 64], even

    Bounds and intervals take numbers, {...} the allowed values themselves, `non-empty` any string
    but ''; `or` joins alternatives, where a bare number stands for itself; `, even` asks for an even
    number besides.
    """

    def __init__(self, spec):
        self.even = spec.endswith(', even')
        parts = spec.removesuffix(', even').split(' or ')
        self.tests = [self._parse(part, alone=len(parts) == 1) for part in parts]

    @staticmethod
    def _parse(part, alone):
        """(a description, a test of a value) for one alternative, or None if the part is no range."""
        if m := _BOUND.match(part):
            compare, bound = _COMPARE[m.group(1)], float(m.group(2))
            return f"a value {m.group(1)} {m.group(2)}", lambda value: compare(value, bound)
        if m := _INTERVAL.match(part):
            above, low, high, below = _COMPARE[m.group(1)], float(m.group(2)), float(m.group(3)), _COMPARE[m.group(4)]
            return f"a value in {part}", lambda value: above(value, low) and below(value, high)
        if m := _CHOICES.match(part):
            choices = [c.strip() for c in m.group(1).split(',')]
            return " or ".join(choices) if len(choices) < 3 else f"one of {', '.join(choices)}", \
                lambda value: str(value) in choices
        if part == 'non-empty':
            return "a non-empty value", lambda value: value != ''
        if not alone and _VALUE.match(part):
            return part, lambda value: value == float(part)
        return None

    def is_range(self):
        return None not in self.tests

    def allows(self, value):
        return any(test(value) for _, test in self.tests) and not (self.even and value % 2)

    def describe(self):
        return ' or '.join(description for description, _ in self.tests) + (', even' if self.even else '')


def constant_range(comment):
    """The Range a constant's comment opens with (`> 0: Adam learning rate`), or None if it opens with none."""
    spec, colon, _ = comment.partition(': ')
    if not colon:
        return None
    allowed = Range(spec)
    return allowed if allowed.is_range() else None


def parse_value(name, text, default):
    """Read `text` as the type of the constant's default value; fail with one line if it is not."""
    kind = type(default)
    if kind is bool:
        if text.lower() in ('1', 'true', 'yes', 'on'):
            return True
        if text.lower() in ('0', 'false', 'no', 'off'):
            return False
    else:
        try:
            value = kind(text)
        except ValueError:
            fail(f"--{name}={text}: expected {kind.__name__} (default {default!r})", 2)
        if kind is not float or math.isfinite(value):
            return value
        fail(f"--{name}={text}: expected a finite number (default {default!r})", 2)
    fail(f"--{name}={text}: expected {kind.__name__} (default {default!r})", 2)


def configure(namespace, argv=None):
    """Apply `--name=value` overrides to a script's constants in place, nanoGPT style, and check every
    constant against the range its comment opens with, before the script does anything.

    `--help` lists every constant with its value, range and meaning. Returns the constants as a dict.
    """
    argv = sys.argv[1:] if argv is None else argv
    names = constant_names(namespace)
    help_of = constant_help(namespace['__file__'])
    if '--help' in argv or '-h' in argv:
        print((namespace.get('__doc__') or '').strip())
        print("\nConstants (override any as --name=value; a range before the colon says which values it takes):")
        width = max(len(n) for n in names)
        for name in names:
            print(f"  --{name:<{width}} = {namespace[name]!r:<24} {help_of.get(name, '')}")
        raise SystemExit(0)
    defaults, given = {name: namespace[name] for name in names}, {}
    for arg in argv:
        if not arg.startswith('--') or '=' not in arg:
            fail(f"cannot read argument {arg!r}: write --name=value (see --help)", 2)
        name, text = arg[2:].split('=', 1)
        if name not in names:
            fail(f"unknown constant {name!r}; valid: {', '.join(names)}", 2)
        namespace[name] = parse_value(name, text, defaults[name])
        given[name] = text
    for name in names:
        allowed = constant_range(help_of.get(name, ''))
        if allowed is not None and not allowed.allows(namespace[name]):
            where = (f"--{name}={given[name]}" if name in given else
                     f"{name} = {namespace[name]!r} in {os.path.basename(namespace['__file__'])}")
            fail(f"{where}: choose {allowed.describe()}", 2)
    for name in names:
        if is_path(name) and namespace[name]:
            namespace[name] = os.path.expanduser(namespace[name])
    if 'data_dir' in names and 'data_dir' not in given and namespace['data_dir'] \
            and not os.path.isabs(namespace['data_dir']):  # the default: the data shipped beside the scripts
        # realpath: the script's own folder, also where it was started through a symbolic link
        namespace['data_dir'] = os.path.join(os.path.dirname(os.path.realpath(namespace['__file__'])),
                                             namespace['data_dir'])
    return {name: namespace[name] for name in names}


def is_path(name):
    """Whether a constant names a file or folder: its '~' stands for the user's home, as in a shell."""
    return name.endswith('_dir') or name in ('weights', 'inception_weights', 'output')


def constants(namespace):
    """A script's constants and their values now: what a run records and a checkpoint must match."""
    return {name: namespace[name] for name in constant_names(namespace)}


@dataclass(frozen=True)
class RunConfig:
    """A training script's configuration, resolved once and handed on as one value."""
    constants: dict        # every constant of the script, after the command line: checked, paths resolved
    model: str             # the name in every output file: MODEL, and '<MODEL>_crop' for CelebA's crop
    bf16_by_default: bool  # whether precision 'auto' may take bf16 for this model (its BF16_BY_DEFAULT)


def resolve(namespace, argv=None):
    """A training script's RunConfig: its constants with the command line's overrides (configure), and for
    CelebA the folders left '' following isCrop, a model of its own. The script's globals (namespace) are
    updated alike, so the script and its run read the same values."""
    constants = configure(namespace, argv)
    if 0 < constants['train_limit'] < constants['batch_size']:
        fail(f"--train_limit={constants['train_limit']} is less than one batch of {constants['batch_size']}; "
             f"raise it or lower --batch_size", 2)
    model = namespace['MODEL']
    if 'isCrop' in constants:
        model += '_crop' if constants['isCrop'] else ''
        for name, default in (('data_dir', celeba_folder(constants['isCrop'])), ('results_dir', f"{model}_results")):
            constants[name] = namespace[name] = constants[name] or default
        data, results = (os.path.realpath(constants[name]) for name in ('data_dir', 'results_dir'))
        if os.path.commonpath([data, results]) == data:  # its grids would be read as faces
            fail(f"--results_dir={constants['results_dir']} is inside the faces' folder {constants['data_dir']}/; "
                 f"pass a --results_dir outside it", 2)
    return RunConfig(constants, model, namespace['BF16_BY_DEFAULT'])
