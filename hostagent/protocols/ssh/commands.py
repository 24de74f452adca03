"""What a shell command line runs, as policy globs should see it.

An agent told `commands = ["rm *"]` is denied can still write `r''m -rf /`,
`ls; rm -rf /`, `echo $(rm -rf /)`, `sh -c 'rm -rf /'` or `sudo rm -rf /`. So a command
line is parsed (bashlex) and every simple command it runs is a value of its own, as its
words with the quotes removed: inside substitutions, subshells, lists, compound commands
and function bodies; the command lines given to `sh -c` (`su -c`, `script -c`, `watch`,
`env -S`), `eval`, `trap`, `alias` and PROMPT_COMMAND; and behind a wrapper (sudo, env,
timeout, xargs, find -exec, ...) the wrapped command once more on its own. The policy
judges them as readings: a deny rule matches if any does, an allow rule only if all do.

What can't be known from the text is said, not guessed: a command whose name is
computed (`$CMD -rf /`, a glob, brace expansion) or a program handed over in a form we
don't read (`eval "$x"`, `bash <<< ...`, `curl ... | sh`, `python3 -c ...`, `source f`,
`bind -x`, a prompt with a command substitution) is flagged `dynamic_command`; a shell
that will read its commands from the session's stdin is flagged `stdin_program` (the
caller then judges those lines as they come). Text bashlex can't parse (`[[ ]]`,
`$(( ))`, `case`, arrays), or that it would read otherwise than bash does (see
`_Text.word`), is `parsed=False`, as is text past the bounds on size, nesting and
count: it takes the policy's `unparseable` decision.

Best effort, by construction: bashlex is not bash, and wrappers and interpreters are an
open set (`awk 'BEGIN{system(...)}'`, `ssh host ...`, `git -c core.pager=...` run
commands we don't see). The flags and the every-value rule are what make an allowlist
hold; a deny list only catches the disguises named here.
"""
from __future__ import annotations

import re
import shlex
from dataclasses import dataclass, field

import bashlex
import bashlex.errors
import bashlex.subst

DYNAMIC = "dynamic_command"
STDIN = "stdin_program"
MAX_TEXT = 64 * 1024
MAX_DEPTH = 8          # texts within texts (sh -c 'sh -c ...')
MAX_COMMANDS = 1000
_MAX_NESTING = 200     # syntax nested within one text (our walk recurses)


@dataclass(frozen=True)
class Commands:
    values: tuple[str, ...]
    parsed: bool
    unknown: tuple[str, ...] = ()
    # files its redirections write (`> f`, `>> f`, `&> f`, `<> f`, `exec {fd}> f`), as
    # written (a non-literal one too); /dev/null and the standard streams left out
    writes: tuple[str, ...] = ()


class _Unparseable(Exception):
    pass


@dataclass(frozen=True)
class _Word:
    text: str        # quotes removed; expansions left as written
    literal: bool    # what the shell will pass is exactly `text`


def _guarded(paramexpand):
    # bashlex loops forever, eating memory, on a `${` with no `}` after it in a word its
    # tokenizer let through (`x'${'`, `$'${'`): made a parse error instead
    def expand(parserobj, string, sindex):
        if string[sindex + 1:sindex + 2] == "{" and "}" not in string[sindex + 2:]:
            raise bashlex.errors.ParsingError("unterminated ${", string, sindex)
        return paramexpand(parserobj, string, sindex)
    expand.guarded = True
    return expand


if not getattr(bashlex.subst._paramexpand, "guarded", False):
    bashlex.subst._paramexpand = _guarded(bashlex.subst._paramexpand)


def split(text: str) -> Commands:
    full = " ".join(text.split())
    found = _Found()
    try:
        found.split(text, 0)
    except _Unparseable:
        return Commands((full,), False)
    return Commands((full, *found.values), True, tuple(dict.fromkeys(found.flags)),
                    tuple(dict.fromkeys(found.writes)))


def reads_commands_from_stdin(command) -> bool:
    """Whether the command (a text, or its argv) runs a shell that reads its commands
    from the session's stdin: `sh`, `bash -s`, `/usr/bin/env bash -l`, `sudo -i`, `su -`."""
    text = command if isinstance(command, str) else shlex.join(command)
    return STDIN in split(text).unknown


# bashlex fails on a quoted here-document delimiter (`<<'EOF'`, the usual way agents
# write files and commit messages); the body of such a one is literal, so it is read
# unquoted (same length, so positions hold) and checked afterwards to be a heredoc
_QUOTED_HEREDOC = re.compile(r"(?<!<)(<<-?[ \t]*)(?:'([\w.-]+)'|\"([\w.-]+)\"|\\([\w.-]+))")
# ... and on the reserved word `time`; the `time` command is the same wrapper to us
_TIME = re.compile(r"((?:^|[;&|(!{]|\b(?:then|do|else|elif|if|while|until))[ \t]*)"
                   r"time(?=[ \t])", re.M)
# what after a `$` makes it an expansion (a quote only outside double quotes)
_EXPANDED = re.compile(r"[A-Za-z0-9_@*#?$!{(\[-]")
_EXPANDS = re.compile(r"[*?]|\[.*\]|\{.*(?:,|\.\.).*\}", re.S)
_ASSIGN = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(?:\[[^]]*\])?\+?=")

# wrapper: (its options that take a value, how many operands precede the command)
_WRAPPERS = {
    "sudo": ({"-u", "-g", "-p", "-C", "-D", "-h", "-r", "-t", "-U", "-T", "-R", "--user",
              "--group", "--prompt", "--chdir", "--role", "--type", "--other-user",
              "--host", "--close-from", "--command-timeout"}, 0),
    "doas": ({"-u", "-C"}, 0),
    "env": ({"-u", "--unset", "-C", "--chdir"}, 0),
    "nice": ({"-n", "--adjustment"}, 0),
    "timeout": ({"-s", "--signal", "-k", "--kill-after"}, 1),
    "xargs": ({"-a", "--arg-file", "-d", "--delimiter", "-E", "-I", "-L", "-n",
               "--max-args", "-P", "--max-procs", "-s", "--max-chars",
               "--process-slot-var"}, 0),
    "time": ({"-o", "--output", "-f", "--format"}, 0),
    "exec": ({"-a"}, 0),
    "stdbuf": ({"-i", "-o", "-e"}, 0),
    "chroot": ({"--userspec", "--groups"}, 1),
    "watch": ({"-n", "--interval", "-d", "-q", "--equexit"}, 0),
    **{name: (set(), 0) for name in ("nohup", "setsid", "command", "builtin", "busybox")},
}
_SHELLS = frozenset("sh bash rbash dash zsh ksh mksh ash yash posh fish csh tcsh".split())
# interpreters, and the letters of their options that take the program as a value
_INTERPRETER = re.compile(r"(python|pypy|perl|ruby|php|lua|luajit|node|nodejs|Rscript)"
                          r"[0-9.]*")
_PROGRAM_OPTS = {"python": "c", "pypy": "c", "perl": "eE", "ruby": "e", "php": "rR",
                 "lua": "e", "luajit": "e", "node": "ep", "nodejs": "ep", "Rscript": "e"}
_INFO = frozenset(("-V", "-v", "--version", "-h", "--help"))
_STDIN_FILES = frozenset(("-", "/dev/stdin", "/dev/fd/0", "/proc/self/fd/0"))
# variables a shell runs, or reads a file named by, or expands again at each prompt
_HOOKS = re.compile(r"(PROMPT_COMMAND|PS[0124]|BASH_ENV|ENV)(?:\[[^]]*\])?\+?=(.*)", re.S)


# redirection operators that write the file they name
_WRITES = frozenset((">", ">>", ">|", "<>", "&>", "&>>", ">&"))
_HARMLESS = re.compile(r"/dev/(?:null|stdout|stderr|tty|fd/[0-2])")


@dataclass
class _Found:
    values: list[str] = field(default_factory=list)
    flags: list[str] = field(default_factory=list)
    writes: list[str] = field(default_factory=list)

    def split(self, text: str, depth: int, nest: int = 0) -> None:
        if depth > MAX_DEPTH or len(text) > MAX_TEXT:
            raise _Unparseable()
        if all(ln.lstrip(" \t")[:1] in ("", "#") for ln in text.split("\n")):
            return                   # blank or comments: runs nothing (bashlex fails on it)
        src = _TIME.sub(r"\1\\time", text)
        quoted = {}

        def unquote(m):
            name = m.group(2) or m.group(3) or m.group(4)
            quoted[m.start() + len(m.group(1))] = False
            return (m.group(1) + name).ljust(len(m.group()))
        src = _QUOTED_HEREDOC.sub(unquote, src)
        try:
            trees = bashlex.parse(src)
        except Exception:            # bashlex raises more than ParsingError on what it lacks
            raise _Unparseable() from None
        _Text(self, src, depth, quoted, nest).walk(trees, False, nest)
        if not all(quoted.values()):     # a rewrite that was not a heredoc after all
            raise _Unparseable()

    def add(self, words: list[_Word]) -> None:
        if len(self.values) >= MAX_COMMANDS:
            raise _Unparseable()
        self.values.append(" ".join(w.text for w in words))


@dataclass
class _Text:
    found: _Found
    src: str
    depth: int
    quoted: dict[int, bool]      # unquoted heredoc delimiters' positions -> seen
    nest: int                    # how deep the command being read is (all texts)

    def walk(self, nodes, stdin: bool, nest: int) -> None:
        for node in nodes:
            self.node(node, stdin, nest)

    def node(self, n, stdin: bool, nest: int) -> None:
        # stdin: the command's stdin is not the session's (a pipe, a redirect)
        if nest > _MAX_NESTING:
            raise _Unparseable()
        kind, nest = n.kind, nest + 1
        if kind == "command":
            return self.command(n, stdin, nest)
        if kind == "pipeline":
            parts = [p for p in n.parts if p.kind not in ("pipe", "reservedword")]
            for i, p in enumerate(parts):
                self.node(p, stdin or i > 0, nest)
        elif kind in ("commandsubstitution", "processsubstitution"):
            self.node(n.command, stdin or self.src[n.pos[0]] == ">", nest)
        elif kind == "parameter" and re.search(r"\$\(|`", getattr(n, "value", "")):
            raise _Unparseable()     # ${x:-$(cmd)}: bashlex leaves the command unparsed
        elif kind == "redirect":
            self.redirect(n, stdin, nest)
        else:
            if kind in ("word", "assignment"):
                self.word(n)             # (checks bashlex found what the shell expands)
            if kind == "function":
                # a body runs where it is called, with that call's stdin (`f() { sh; };
                # f < script`): not known to be the session's
                stdin = True
            redirects = getattr(n, "redirects", None) or []
            stdin = stdin or any(_reads_stdin(r) for r in redirects)
            self.walk(getattr(n, "parts", None) or getattr(n, "list", None) or [], stdin, nest)
            self.walk(redirects, stdin, nest)

    def redirect(self, r, stdin: bool, nest: int) -> None:
        heredoc = getattr(r, "heredoc", None)
        if heredoc is not None:
            at = r.output.pos[0]
            if at in self.quoted:
                self.quoted[at] = True
            elif re.search(r"\$\(|`", heredoc.value):
                self.found.flags.append(DYNAMIC)   # bashlex doesn't parse heredoc bodies
        if not isinstance(r.output, int) and not isinstance(r.output, str):
            if r.type in _WRITES and heredoc is None and r.output.kind == "word":
                target = self.word(r.output).text
                if not _HARMLESS.fullmatch(target):
                    self.found.writes.append(target)
            self.node(r.output, stdin, nest)

    def word(self, n) -> _Word:
        """The word as the shell passes it. Not bashlex's `word`: its quote removal is
        wrong for mixed quoting (`"r"'m'`), and it misses expansions in a word that
        starts and ends with a single quote (`'a'$(rm -rf /)'b'`): every place the
        shell expands must be one where bashlex found an expansion, or it is not
        taken as parsed."""
        src, (i, end) = self.src, n.pos
        parts = {p.pos[0]: p.pos[1] for p in getattr(n, "parts", None) or []
                 if p.kind != "tilde"}
        text, plain, dq, expands = [], [], False, False
        while i < end:
            c, nxt = src[i], src[i + 1:i + 2]
            if i in parts:
                text.append(src[i:parts[i]])
                expands, i = True, parts[i]
                continue
            if c == "\\" and (not dq or nxt in '$`"\\\n'):
                text.append(nxt if nxt != "\n" else "")
                plain.append("_")
                i += 2
            elif c == "'" and not dq:
                j = src.find("'", i + 1, end)
                if j < 0:
                    raise _Unparseable()
                text.append(src[i + 1:j])
                plain.append("_")
                i = j + 1
            elif c == '"':
                dq, i = not dq, i + 1
            elif c == "`" or c == "$" and nxt and (_EXPANDED.match(nxt) or not dq
                                                   and nxt in "'\"") \
                    or c in "<>" and nxt == "(" and not dq:
                raise _Unparseable()     # the shell expands here; bashlex saw nothing
            else:
                text.append(c)
                plain.append("_" if dq else c)
                i += 1
        if dq:
            raise _Unparseable()
        return _Word("".join(text), not expands and not _EXPANDS.search("".join(plain)))

    def command(self, n, stdin: bool, nest: int) -> None:
        self.nest = nest
        assigns = [self.word(p) for p in n.parts if p.kind == "assignment"]
        words = [self.word(p) for p in n.parts if p.kind == "word"]
        for a in assigns:
            self.hook(a)
        redirects = [p for p in n.parts if p.kind == "redirect"]
        stdin = stdin or any(_reads_stdin(p) for p in redirects)
        if len(words) == 1 and words[0].text == "exec" and any(_reads_stdin(p) for p in redirects):
            self.flag(DYNAMIC)       # `exec < f`: the shell reads its commands from f now
        self.found.add(assigns + words)
        self.run(words, stdin, again=bool(assigns and words))
        self.walk(n.parts, stdin, nest)      # substitutions in words, redirects

    def run(self, words: list[_Word], stdin: bool, again: bool = True) -> None:
        """A simple command's words after its assignments: what it runs in turn."""
        if again:
            self.found.add(words)
        if not words:
            return
        if not words[0].literal:
            return self.flag(DYNAMIC)
        name, args = words[0].text.rsplit("/", 1)[-1], words[1:]
        fam = _INTERPRETER.fullmatch(name)
        if name in _WRAPPERS:
            self.unwrap(name, args, stdin)
        elif name in _SHELLS:
            self.shell(args, stdin)
        elif fam:
            self.interpreter(_PROGRAM_OPTS[fam.group(1)], args)
        elif name == "eval":
            self.program(args)
        elif name in ("source", ".") and args:
            self.flag(DYNAMIC)
        elif name in ("su", "script"):     # -c: a command line; else a shell
            for i, a in enumerate(args):
                t = a.text
                if t.startswith("--command="):
                    return self.program([_Word(t[10:], a.literal)])
                if t == "--command" or t[:1] == "-" != t[1:2] and t.endswith("c"):
                    if i + 1 == len(args):
                        return self.flag(DYNAMIC)
                    return self.program(args[i + 1:i + 2])
            self.reads(stdin)
        elif name in ("export", "declare", "typeset", "local", "readonly"):
            for a in args:
                self.hook(a)
        elif name == "bind" and not {a.text for a in args} <= set("-l -p -P -v -V -s -S".split()):
            self.flag(DYNAMIC)       # keys bound to run commands, or to run the line
        elif name == "trap" and len(args) > 1 and not args[0].text.startswith("-"):
            self.program(args[:1])
        elif name == "alias":
            for a in args:
                if "=" in a.text:
                    self.program([_Word(a.text.split("=", 1)[1], a.literal)])
        elif name == "find":
            for i, a in enumerate(args):
                if a.text in ("-exec", "-execdir", "-ok", "-okdir"):
                    end = next((j for j in range(i + 1, len(args))
                                if args[j].text in (";", "+")), len(args))
                    self.run(_replacing(args[i + 1:end], "{}"), stdin)

    def unwrap(self, name: str, args: list[_Word], stdin: bool) -> None:
        takes, operands = _WRAPPERS[name]
        i, opts = 0, []
        while i < len(args):
            a = args[i].text
            if name in ("env", "sudo", "doas") and _ASSIGN.match(a):
                self.hook(args[i])
                i += 1
            elif a.startswith("-") and a != "--":
                if name == "env" and a in ("-S", "--split-string"):
                    return self.program(args[i + 1:])   # env -S 'cmd args': split again
                opts.append(a)
                i += 2 if a in takes else 1
            else:
                i += a == "--"
                break
        rest = args[i + operands:]
        if name in ("sudo", "doas") and not rest and any(
                o in ("--shell", "--login") or not o.startswith("--") and set(o) & set("si")
                for o in opts):
            return self.reads(stdin)             # sudo -i / sudo -s: a shell
        if name == "xargs":
            # the replace string (-I X, -i) stands for input we don't see
            for j, a in enumerate(w.text for w in args[:i]):
                mark = (args[j + 1].text if a == "-I" else a[2:] if a.startswith("-I")
                        else a[2:] or "{}" if a.startswith("-i")
                        else a[10:] or "{}" if a.startswith("--replace") else "")
                rest = _replacing(rest, mark) if mark else rest
        if name == "watch" and not {"-x", "--exec"} & set(opts):
            return self.program(rest)            # (watch runs it with sh -c)
        if rest:
            self.run(rest, stdin)

    def shell(self, args: list[_Word], stdin: bool) -> None:
        i, command, from_stdin = 0, False, False
        while i < len(args):
            a = args[i].text
            if a in ("-", "--"):
                i += 1
                break
            if not (len(a) > 1 and a[0] in "-+"):
                break
            if not a.startswith("--"):
                command |= a[0] == "-" and "c" in a
                from_stdin |= a[0] == "-" and "s" in a
            # -o/+o/-O name, --rcfile file: the next word is the option's
            i += 2 if a[-1] in "oO" and not a.startswith("--") or a in (
                "--rcfile", "--init-file") else 1
        if command and i < len(args):
            self.program(args[i:i + 1])
        elif command:
            self.flag(DYNAMIC)
        elif from_stdin or i >= len(args) or args[i].text in _STDIN_FILES:
            self.reads(stdin)
        elif not args[i].literal:
            self.flag(DYNAMIC)       # a script from `<(...)`, `$f`
        # (else it runs a script file: no more known of it than of `./script`)

    def interpreter(self, letters: str, args: list[_Word]) -> None:
        for a in args:
            t = a.text
            if t in _INFO:
                return
            if t == "-" or t.split("=")[0] in ("--eval", "--print", "--command"):
                break
            if t.startswith("--"):
                continue
            if not t.startswith("-"):
                if _a_file(a):
                    return           # a script file
                break
            if set(t[1:]) & set(letters):
                break
            if letters == "c" and t.endswith("m"):
                return               # python -m module
        self.flag(DYNAMIC)           # a program in a word, or on stdin

    def hook(self, w: _Word) -> None:
        """An assignment to a variable whose value a shell runs later."""
        m = _HOOKS.fullmatch(w.text)
        if m and m.group(1) == "PROMPT_COMMAND":
            self.program([_Word(m.group(2), w.literal)])
        elif m and (m.group(1) in ("BASH_ENV", "ENV") or re.search(r"\$\(|`", m.group(2))):
            self.flag(DYNAMIC)       # a file it reads; a prompt's command substitution

    def reads(self, stdin: bool) -> None:
        self.flag(DYNAMIC if stdin else STDIN)

    def program(self, words: list[_Word]) -> None:
        """Words the shell will run as a command line (sh -c, eval, trap)."""
        if not words:
            return
        if not all(w.literal for w in words):
            return self.flag(DYNAMIC)
        self.found.split(" ".join(w.text for w in words), self.depth + 1, self.nest)

    def flag(self, name: str) -> None:
        self.found.flags.append(name)


def _a_file(w: _Word) -> bool:
    """A script file named as it is, and not the session's stdin."""
    return w.literal and w.text not in _STDIN_FILES


def _reads_stdin(r) -> bool:
    # (`0>&3`, `0<>f`: fd 0 redirected by any operator is not the session's stdin)
    fd = getattr(r, "input", None)
    return r.type.startswith("<") and fd in (None, 0) or fd == 0


def _replacing(words: list[_Word], mark: str) -> list[_Word]:
    return [_Word(w.text, w.literal and mark not in w.text) for w in words]
