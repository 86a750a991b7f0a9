"""``%undo``: a thin wrapper over :func:`nbcompress.engine.core.history.undo_`."""

from __future__ import annotations

from IPython.core.magic import line_magic, magics_class
from IPython.core.magic_arguments import argument, magic_arguments, parse_argstring

from nbcompress.engine.core.history import undo_
from nbcompress.notebook.display.history import ModelHistory, recorded_steps
from nbcompress.notebook.magics._common import ModelMagics, engine_errors

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
    def undo(self, line: str) -> ModelHistory:
        """Revert the last compression step of a model bit-exactly (``--all``: every step).

        Steps made on a sub-module count as the model's: after ``%prune model.encoder 0.5``,
        ``%undo model`` reverts that pruning. ``%undo model --list`` shows the recorded
        steps (with the sub-module each was made on) and the memory undo holds. Returns the
        :class:`History` of the steps that remain.
        """
        args = parse_argstring(self.undo, line)
        model = self.model(args.model)
        before = recorded_steps(model)
        if args.list:
            return ModelHistory(before, args.model)
        with engine_errors():
            undo_(model, all=args.all, force=args.force)
        after = recorded_steps(model)
        kept = {id(step) for _, step in after}
        gone = ModelHistory([(p, s) for p, s in before if id(s) not in kept], args.model)
        names = ", ".join(
            f"'{step.name}'" + (f" on {gone.where(i)}" if gone.paths[i] else "")
            for i, step in reversed(list(enumerate(gone)))
        )
        print(f"Undid {names or 'nothing'}; {len(after)} step(s) remain.")
        return ModelHistory(after, args.model)
