"""A pure-Python PTB tokenizer that gives the tokens of the CoreNLP 3.4.1 PTBTokenizer COCO runs.

COCO caption evaluation (pycocoevalcap) tokenizes with the Stanford PTBTokenizer of CoreNLP 3.4.1
(``-preserveLines -lowerCase``) and then drops its punctuation tokens. That tokenizer is a JFlex
lexer: at every position the rule with the longest match wins (trailing context counts towards the
length), ties go to the earlier rule, and a rule may give back characters (``cannot`` -> ``can`` +
``not``) or repeat a period (``the U.S. The`` -> ``u.s.`` ``.``). This module re-implements those
rules from their observed behaviour, for the text that reports and answers are made of: letters,
digits, spaces and the punctuation ``. , ; : ? ! ( ) [ ] ' " / % -`` (:data:`REPORT_TEXT`). On that
alphabet it is tested token for token against the jar on more than 20,000 sentences
(``tests/test_ptb_tokenizer.py``). Outside it (URL-like or SGML-like text, e-mail addresses,
currency, emoticons, symbols) the rules are incomplete; where Java is on PATH the scorers use the
jar itself (``report_metrics.resolve_tokenizer``).

Notable behaviours reproduced: a period between letters stays inside the word (``apex.There`` ->
``apex.there``, ``XXXX.In``); abbreviations keep their period (``dr.``, ``e.g.``, ``fig. 3``) and a
sentence-final one is followed by a repeated ``.`` token (``CT. The`` -> ``ct.`` ``.``, because
``Ct`` is a state abbreviation to the lexer); hyphenated words, decimals, dates, fractions and
phone numbers are single tokens; ``n't``, ``'s``-type clitics and ``cannot``/``gonna`` are split;
brackets become ``-lrb-``/``-rrb-``/``-lsb-``/``-rsb-``; double quotes become the PTB quotes.
"""

from __future__ import annotations

import re
from collections.abc import Callable

import regex

# The text the tokenizer is exact on (see the module docstring).
REPORT_TEXT = re.compile(r"[A-Za-z0-9 \n.,;:?!()\[\]'\"/%-]*")

_L = "[A-Za-z]"
_LD = "[A-Za-z0-9]"
_APOS = "'"
_WORD = rf"{_L}{_LD}*(?:[.!?]{_L}{_LD}*)*"
_REDAUX = r"'(?:[msdMSD]|(?i:re|ve|ll))"
_SWORD = "[A-Za-z]*[A-MO-Za-mo-z]"
_SREDAUX = r"(?i:n)'(?i:t)"
_NUM = r"[0-9]+|[0-9]*(?:[.:,][0-9]+)+"
_SPACE = "[ \t\u00a0]"
_SPACENL = "[ \t\u00a0\n\r]"
_ACRO = r"[A-Za-z](?:\.[A-Za-z])*"
# Abbreviations as the 3.4.1 lexer knows them (caseless except where a letter class is written).
_ABMONTH = "(?i:jan|feb|mar|apr|jun|jul|aug|sep|sept|oct|nov|dec)"
_ABDAYS = "(?i:mon|tue|tues|wed|thu|thurs|fri)"
_ABSTATE = ("(?:(?i:ala|ariz|calif|colo|conn|ct|dak|fla|ga|ind|kans?|ky|md|mich|minn|mo|mont|neb|nev|okla|"
            "penn|tenn|va|vt|wisc?|wyo)|A(?i:z|rk)|D(?i:el)|I(?i:ll)|L(?i:a)|M(?i:ass|iss)|O(?i:re)|P(?i:a)|"
            "T(?i:ex)|W(?i:ash))")  # fmt: skip
_ABCOMP = "(?i:inc|cos?|corp|pp?t[ye]s?|ltd|plc|rt|bancorp|bhd|assn|univ|intl|sys)"
_ABNUM = "(?i:tel|est|ext|sq)"
_ABPTIT = r"(?i:jr|sr|bros|(?:ed|ph)\.d|blvd|rd|esq)"
_ABBREV1 = rf"(?:{_ABMONTH}|{_ABDAYS}|{_ABSTATE}|{_ABCOMP}|{_ABNUM}|{_ABPTIT}|(?i:etc|al|seq|bldg))\."
_ABTITLE = ("(?:(?i:mr|mrs|ms|drs?|profs?|sens?|reps?|attys?|lt|col|gen|messrs|govs?|adm|rev|maj|sgt|cpl|pvt|capt|"
            "ste?|ave|pres|lieut|hon|brig|co?mdr|pfc|spc|supts?|det|mt|ft|adj|adv|asst|assoc|ens|insp|mlle|mme|"
            "msgr|sfc)|M(?i:iss))")  # fmt: skip
_ABCOMP2 = "(?i:invt|elec|natl|m[ft]g|dept)"
_ABBREV4 = rf"(?:{_ABTITLE}|(?i:vs|alex|wm|jos|cie|a\.k\.a|cf|treas|ph)|{_ACRO}|{_ABCOMP2})"
_ABBREV3 = r"(?i:ca|figs?|prop|nos?|arts?|bldg|pp|op)\."
# Words after which an acronym's period is also a sentence end (case-sensitive first letter).
_SENT_STARTERS = ("A(?i:bout|ccording|dditionally|fter|n|s|t)?|B(?i:ut)|E(?i:arlier)|H(?i:e|er|ere|owever)|"
                  "I(?i:f|n|t)|L(?i:ast)|M(?i:any|ore|r\\.|s\\.)|N(?i:ow)|O(?i:nce|ne|ther|ur)|"
                  "S(?i:he|ince|o|ome|uch)|T(?i:hat|he|hen|here|hese|hey|his)|W(?i:e|hen|hile|hat)|Y(?i:et|ou)")  # fmt: skip
_URL_END = r"[^ \t\n\f\r\"<>|.!?(){},-]"
_LIKELYURL = (r"(?:(?:www\.(?:[^ \t\n\f\r\"<>|.!?(){},]+\.)+[a-zA-Z]{2,4})|(?:(?:[^ \t\n\f\r\"`'<>|.!?(){},-_$]+\.)+"
              r"(?i:com|net|org|edu)))(?:/[^ \t\n\f\r\"<>|()]+" + _URL_END + ")?")  # fmt: skip
_HTHING = rf"{_LD}[A-Za-z0-9.,]*(?:-{_LD}+)+"
_THING = rf"(?:[dDoOlL]'{_LD})?{_LD}+(?:[-_](?:[dDoOlL]'{_LD})?{_LD}+)*"
_APOWORD = (rf"'(?i:n)'|[lLdDjJ]'|(?i:dunkin|somethin|ol)'|'(?i:em)|[A-HJ-XZn]'{_L}{{2}}{_L}*|'[2-9]0(?i:s)|'(?i:till?)|"
            rf"{_L}+[aeiouyAEIOUY]'[aeiouA-Z]{_L}*|'(?i:cause)|(?i:cont'd)\.?|(?i:nor'easter|c'mon|e'er|s'mores|"
            r"ev'ry|li'l|nat'l)")  # fmt: skip
# Note the range ",-_" (0x2C-0x5F: digits, upper case, ":/[]" ...) excluded from a LIKELYURL domain part, as in
# the lexer, whose caselessness does not reach into character classes: only lower-case domains are URLs.
_FILENAME_EXT = ("(?i:bat|bmp|bz2|c|class|cgi|cpp|dll|doc|docx|exe|gif|gz|h|htm|html|jar|java|jpeg|jpg|mov|mp3|pdf|php|pl|"
                 "png|ppt|ps|py|sql|tar|txt|wav|x|xml|zip)")  # fmt: skip
_FILENAME = rf"{_LD}+(?:\.{_LD}+)*\.{_FILENAME_EXT}"
_PHONE = (r"(?:\([0-9]{2,3}\)[ \u00a0]?|(?:\+\+?)?(?:[0-9]{2,4}[- \u00a0])?[0-9]{2,4}[- \u00a0])[0-9]{3,4}[- \u00a0]?[0-9]{3,5}"
          r"|(?:(?:\+\+?)?[0-9]{2,4}\.)?[0-9]{2,4}\.[0-9]{3,4}\.[0-9]{3,5}")
_LDOTS = r"\.{3,5}|(?:\.[ \u00a0]){2,4}\."

BRACKETS = {"(": "-LRB-", ")": "-RRB-", "[": "-LSB-", "]": "-RSB-", "{": "-LCB-", "}": "-RCB-"}

# A rule: (pattern of the token, trailing context or None, action). Actions: "keep", ("back", n): give back
# the last n characters, "period": the token with its period, then the period again (a sentence-final
# abbreviation), "acronym": as "period" but a one-letter acronym loses its period, "spaces": spaces inside
# the token become no-break spaces, or a function of the token text.
Action = str | tuple[str, int] | Callable[[str], str]
RULES: list[tuple[str, str | None, Action]] = [
    ("(?i:cannot)", None, ("back", 3)),
    ("'(?i:twas)", None, ("back", 3)),
    ("'(?i:tis)|(?i:gonna|gotta|lemme|gimme|wanna)", None, ("back", 2)),
    (_WORD, _REDAUX, "keep"),
    (_SWORD, _SREDAUX, "keep"),
    (_WORD, None, "keep"),
    (_APOWORD, None, "keep"),
    ("[yY]'", _L, "keep"),
    (r"(?i:https?)://[^ \t\n\f\r\"<>|()]+" + _URL_END, None, "keep"),
    (_LIKELYURL, None, "keep"),
    (_REDAUX, "[^A-Za-z]", "keep"),
    (_SREDAUX, None, "keep"),
    (r"[0-9]{1,2}[-/][0-9]{1,2}[-/][0-9]{2,4}", None, "keep"),
    (rf"[-+]?(?:{_NUM})", None, "keep"),
    (r"(?:[0-9]{1,4}[- \u00a0])?[0-9]{1,4}\\?/[0-9]{1,4}", None, "spaces"),
    (rf"{_LD}+(?:-{_L}+){{0,2}}(?:\\?/{_LD}+(?:-{_L}+){{0,2}}){{1,2}}", None, "keep"),
    (rf"{_ACRO}\.", f"{_SPACENL}+(?:{_SENT_STARTERS}){_SPACENL}", "acronym"),
    (_ABBREV3, f"{_SPACENL}?[0-9]", "keep"),
    (_ABBREV1, rf"{_SPACENL}(?:{_SPACENL}|[A-Z])", "period"),
    (_ABBREV1, r"[\s\S][\s\S]", "keep"),
    (_ABBREV1, None, "period"),
    (rf"(?:[A-Za-z]|{_ABBREV4})\.", None, "keep"),
    (_ACRO, _SPACENL, "keep"),
    ("'[0-9][0-9]", _SPACENL, "keep"),
    (_FILENAME, f"{_SPACENL}|[.?!,\"'<]", "keep"),
    (rf"{_WORD}\.", "[,;:]", "keep"),
    (_PHONE, None, lambda t: t.replace(" ", "\u00a0").replace("(", "-LRB-").replace(")", "-RRB-")),
    ('"', "[A-Za-z0-9$]", lambda t: "``"),
    ('"', None, lambda t: "''"),
    (r"[()\[\]{}]", None, BRACKETS.__getitem__),
    (r"-+", None, lambda t: "--" if 3 <= len(t) <= 4 else t),
    (_LDOTS, None, lambda t: "..."),
    ("[,;:]", None, "keep"),
    ("[?!]+", None, "keep"),
    (r"\.", None, "keep"),
    ("/", None, "keep"),
    (_HTHING, None, "keep"),
    (rf"{_HTHING}\.", "[,;:]", "keep"),
    (_THING, None, "keep"),
    (rf"{_THING}\.", "[,;:]", "keep"),
    (r"[<>]?[:;=][-oO*']?[()DPdpO\\{@|\[\]]", "[^A-Za-z0-9]", lambda t: t.replace("(", "-LRB-").replace(")", "-RRB-")),
    (r"\([-'x]\.?[-'x]\)|\(['x]-['x]\)", None, lambda t: t.replace("(", "-LRB-").replace(")", "-RRB-")),
    ("'", _L, lambda t: "`"),
    ("'", None, "keep"),
    ("[^ \t\n\r\u00a0]", None, "keep"),
]
_COMPILED = [(regex.compile(f"({token}){'(?:' + context + ')' if context else ''}", regex.POSIX), action)
             for token, context, action in RULES]  # fmt: skip
CONTEXT_CHARS = 64  # longer than any trailing context of a rule
_SKIP = re.compile(r"[ \t\n\r\u00a0]+")
# Fast path, the same result as the rules: a plain word before a space, comma, semicolon or closing
# bracket (no longer rule can match there), or a comma or lone period before a space.
_PLAIN = re.compile(r"[A-Za-z]+(?=[ \n,;)\]]|$)|,(?![0-9])|\.(?=[ \n](?![.\n])|$)")
_GIVE_BACK = frozenset({"cannot", "gonna", "gotta", "lemme", "gimme", "wanna"})


def ptb_tokenize_lines(texts: list[str]) -> list[list[str]]:
    """The lower-cased PTB tokens of each text, lexed as the jar lexes them: as the lines of one input.

    A rule's trailing context can reach into the next line (``... x.`` then a line starting ``The``
    makes ``x`` ``.``, not ``x.``), so a text's tokens depend on the text after it, as in COCO, which
    sends every caption of a set through one call (joined by newlines, none after the last).
    """
    lines = [t.replace("\r", " ").replace("\n", " ") for t in texts]
    out = []
    for i, line in enumerate(lines):
        # the following lines, as far as a rule's trailing context can look (a few words)
        after, j = "", i + 1
        while j < len(lines) and len(after) < CONTEXT_CHARS:
            after, j = after + "\n" + lines[j], j + 1
        out.append([token for start, token in _lex(line + after) if start < len(line)])
    return out


def ptb_tokens(text: str) -> list[str]:
    """The lower-cased PTB tokens of one text on its own (newlines count as spaces)."""
    return ptb_tokenize_lines([text])[0]


def _lex(text: str) -> list[tuple[int, str]]:
    """(start, lower-cased token) for every token of ``text``: the longest match of any rule, ties to the first."""
    tokens: list[tuple[int, str]] = []
    pos, end = 0, len(text)
    while pos < end:
        skip = _SKIP.match(text, pos)
        if skip:
            pos = skip.end()
            continue
        plain = _PLAIN.match(text, pos)
        if plain and plain.group().lower() not in _GIVE_BACK:
            tokens.append((pos, plain.group().lower()))
            pos = plain.end()
            continue
        best, best_length, best_action = None, -1, None
        for pattern, action in _COMPILED:
            match = pattern.match(text, pos)
            if match and match.end() - pos > best_length:
                best, best_length, best_action = match, match.end() - pos, action
        assert best is not None and best_action is not None  # the last rule matches any character
        token = best.group(1)
        advance = len(token)
        if isinstance(best_action, tuple):  # give characters back: they are lexed again
            token, advance = token[: -best_action[1]], advance - best_action[1]
        elif best_action in ("period", "acronym"):  # the period is lexed again, as a token of its own
            advance -= 1
            if best_action == "acronym" and len(token) == 2:
                token = token[:-1]
        elif best_action == "spaces":
            token = token.replace(" ", "\u00a0")
        elif callable(best_action):
            token = best_action(token)
        tokens.append((pos, token.lower()))
        pos += advance
    return tokens
