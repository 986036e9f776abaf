"""Table pieces shared by the report sections: the model colour map type, a model-name cell and
dropping the columns of a table that no row fills."""

from __future__ import annotations

from peftlab.report import fmt
from peftlab.report.doc import Cell, Table, cell_text
from peftlab.report.fmt import display

Colors = dict[str, str]


def model_cell(name: str, colors: Colors, bold: bool = False) -> Cell:
    return Cell(display(name), bold=bold, color=colors.get(name))



def drop_empty_columns(table: Table) -> Table:
    """Remove the columns where no row has a value (every cell is `fmt.MISSING`)."""
    keep = [
        i for i in range(len(table.headers)) if any(cell_text(row[i]) != fmt.MISSING for row in table.rows)
    ]
    return Table(
        [table.headers[i] for i in keep],
        [[row[i] for i in keep] for row in table.rows],
        "".join(table.align[i] for i in keep),
        caption=table.caption,
        notes=table.notes,
    )
