//! A small column formatter for `list` output: a header row, then one row per item, each column
//! left-aligned to its widest cell, columns two spaces apart, no trailing spaces.

/// Space between two columns.
const GAP: &str = "  ";

/// Renders `headers` and `rows` as aligned text, one line per row, each ending with `\n`.
/// Control characters in cells (newlines, tabs) become spaces so that a row stays one line.
/// Rows shorter than the header leave their last columns empty; longer ones are cut.
pub fn format_table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let header: Vec<String> = headers.iter().map(|h| clean(h)).collect();
    let body: Vec<Vec<String>> = rows
        .iter()
        .map(|row| {
            (0..headers.len())
                .map(|i| row.get(i).map(|c| clean(c)).unwrap_or_default())
                .collect()
        })
        .collect();

    let mut widths: Vec<usize> = header.iter().map(|h| width(h)).collect();
    for row in &body {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(width(cell));
        }
    }

    let mut out = String::new();
    for row in std::iter::once(&header).chain(&body) {
        let mut line = String::new();
        for (i, (cell, w)) in row.iter().zip(&widths).enumerate() {
            if i > 0 {
                line.push_str(GAP);
            }
            line.push_str(cell);
            line.extend(std::iter::repeat_n(' ', w - width(cell)));
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

/// Renders `field: value` lines (the `get`/`update` view).
pub fn format_fields(fields: &[(&str, String)]) -> String {
    let mut out = String::new();
    for (name, value) in fields {
        out.push_str(name);
        out.push_str(": ");
        out.push_str(&clean(value));
        out.push('\n');
    }
    out
}

/// Display width, counted in characters (IDs, names and hints such as `vk-fr…1234` are not wide).
fn width(s: &str) -> usize {
    s.chars().count()
}

fn clean(s: &str) -> String {
    s.chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(cells: &[&str]) -> Vec<String> {
        cells.iter().map(|c| (*c).to_owned()).collect()
    }

    #[test]
    fn aligns_columns_to_the_widest_cell() {
        let out = format_table(
            &["ID", "NAME", "ENABLED"],
            &[
                row(&["vkey-1", "Frontend-App", "true"]),
                row(&["vkey-22", "x", "false"]),
            ],
        );
        assert_eq!(
            out,
            "ID       NAME          ENABLED\n\
             vkey-1   Frontend-App  true\n\
             vkey-22  x             false\n"
        );
    }

    #[test]
    fn header_only_when_empty() {
        assert_eq!(format_table(&["ID", "NAME"], &[]), "ID  NAME\n");
    }

    #[test]
    fn counts_characters_not_bytes_and_has_no_trailing_spaces() {
        let out = format_table(
            &["HINT", "X"],
            &[row(&["vk-fr…1234", ""]), row(&["ab", "y"])],
        );
        assert_eq!(out, "HINT        X\nvk-fr…1234\nab          y\n");
        assert!(out.lines().all(|l| !l.ends_with(' ')));
    }

    #[test]
    fn keeps_rows_on_one_line_and_tolerates_ragged_rows() {
        let out = format_table(
            &["A", "B"],
            &[row(&["line1\nline2"]), row(&["a", "b", "c"])],
        );
        assert_eq!(out, "A            B\nline1 line2\na            b\n");
    }

    #[test]
    fn fields_are_name_colon_value() {
        let out = format_fields(&[("id", "conn-1".to_owned()), ("name", "a\nb".to_owned())]);
        assert_eq!(out, "id: conn-1\nname: a b\n");
    }
}
