#!/usr/bin/env python3
"""The server messages of a connection refused for now (57P03: starting up, shutting down, in
recovery, not accepting connections; 53300: no free slot), in every language of PostgreSQL's
installed message catalogs (Debian's postgresql-NN puts them in
/usr/share/locale/*/LC_MESSAGES/postgres-NN.mo): prints the templates that
src/postgres/messages.rs lists, one Rust string per line. A failed connection carries no
SQLSTATE, and a server's refusal comes in its lc_messages. A template is the whole message,
with %s where the server puts a role's or a database's name; the reserved slots' message is
cut after its first words (later versions reword its tail).
usage: scripts/pg_messages.py [MAJOR] (default 15)"""
import gettext, glob, sys

major = sys.argv[1] if len(sys.argv) > 1 else "15"
ENGLISH = ["the database system is starting up", "the database system is shutting down",
           "the database system is in recovery mode",
           "the database system is not yet accepting connections",
           "the database system is not accepting connections", "sorry, too many clients already",
           "remaining connection slots are reserved", "too many connections for role",
           "too many connections for database"]
seen = set()
for mo in sorted(glob.glob(f"/usr/share/locale/*/LC_MESSAGES/postgres-{major}.mo")):
    lang = mo.split("/")[4]
    catalog = gettext.GNUTranslations(open(mo, "rb"))._catalog
    for msgid, text in sorted((k, v) for k, v in catalog.items() if isinstance(k, str)):
        for english in ENGLISH:
            whole = english.startswith("the database system") or english.startswith("sorry")
            if not msgid.startswith(english) or (whole and msgid != english):
                continue
            text = " ".join(text.split())
            if english.startswith("remaining"):
                # Its tail names the reserved roles, which later versions reword.
                fragment = text.split(",")[0]
                words = []
                for word in fragment.split(" ")[:4]:
                    if any(w in word.lower() for w in ("replica", "superuser", "-")):
                        break
                    words.append(word)
                fragment = " ".join(words) if len(words) > 1 else fragment[:9]
            else:
                fragment = text.rstrip(".")
            fragment = fragment.replace("\\", "\\\\").replace('"', '\\"')
            if fragment not in seen:
                seen.add(fragment)
                print(f'    "{fragment}", // {lang}: {english}')
