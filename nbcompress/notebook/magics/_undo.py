"""``%undo``: a thin wrapper over :func:`nbcompress.engine.core.history.undo_`."""

from __future__ import annotations

from IPython.core.magic import line_magic, magics_class
from IPython.core.magic_arguments import argument, magic_arguments, parse_argstring

from nbcompress.engine.core.history import History, history, undo_
from nbcompress.notebook.magics._common import ModelMagics, engine_errors, module_name

__all__ = ["UndoMagics"]


@magics_class
class UndoMagics(ModelMagics):
    """The ``%undo`` magic."""

    @magic_arguments()
    @argument("model", help="The model: any expression in the namespace.")
    @argument("--all", action="store_true", help="Undo every step, back to the original.")
    @argument("--force", action="store_true", help="Undo even if weights changed since.")
    @argument("--list", action="store_true", help="Only list the recorded steps.")
    @line_magic
    def undo(self, line: str) -> History:
        """Revert the last compression step of a model bit-exactly (``--all``: every step).

        Steps made on a sub-module count as the model's: after ``%prune model.encoder 0.5``,
        ``%undo model`` reverts that pruning. ``%undo model --list`` shows the recorded
        steps (with the sub-module each was made on) and the memory undo holds. Returns the
        :class:`History` of the steps that remain.
        """
        args = parse_argstring(self.undo, line)
        model = self.model(args.model)
        before = history(model)
        if args.list:
            return before
        with engine_errors():
            undo_(model, all=args.all, force=args.force)
        left = history(model)
        kept = {id(step) for step in left}
        names = []
        for step in reversed(before):
            if id(step) not in kept:
                where = module_name(before, step, args.model)
                names.append(f"'{step.name}'" + ("" if where == args.model else f" on {where}"))
        print(f"Undid {', '.join(names) or 'nothing'}; {len(left)} step(s) remain.")
        return left
