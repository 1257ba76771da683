"""``python -m membench.compat``: check every patch target against the installed packages."""

from membench.compat import check_all

for entry in check_all():
    print(f"ok  {entry}")
