//! Label selector syntax, checked when the config is loaded rather than when the API server
//! refuses the first list.

/// Checks a label selector's syntax as the API server would: comma-separated requirements
/// `key`, `!key`, `key=value`, `key==value`, `key!=value`, `key in (a,b)`, `key notin (a,b)`.
pub fn check_selector(sel: &str) -> Result<(), String> {
    if sel.trim().is_empty() {
        return Err("empty; leave \"selector\" out to take every object".into());
    }
    for req in split_requirements(sel)? {
        let req = req.trim();
        if req.is_empty() {
            return Err("an empty requirement (two commas in a row?)".into());
        }
        if let Some(key) = req.strip_prefix('!') {
            check_key(key.trim())?;
            continue;
        }
        let set = [" notin ", " in "].iter().find_map(|op| req.split_once(op));
        if let Some((key, values)) = set {
            check_key(key.trim())?;
            let values = values.trim();
            let inner = values
                .strip_prefix('(')
                .and_then(|v| v.strip_suffix(')'))
                .ok_or(
                    "\"in\" and \"notin\" take values in parentheses, such as \"env in (a,b)\"",
                )?;
            for v in inner.split(',') {
                check_value(v.trim())?;
            }
            continue;
        }
        let (key, value) = if let Some((k, v)) = req.split_once("!=") {
            (k, Some(v))
        } else if let Some((k, v)) = req.split_once("==") {
            (k, Some(v))
        } else if let Some((k, v)) = req.split_once('=') {
            (k, Some(v))
        } else {
            (req, None)
        };
        check_key(key.trim())?;
        if let Some(v) = value {
            check_value(v.trim())?;
        }
    }
    Ok(())
}

/// Splits at commas outside parentheses.
fn split_requirements(sel: &str) -> Result<Vec<&str>, String> {
    let (mut out, mut depth, mut start) = (Vec::new(), 0i32, 0);
    for (i, c) in sel.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => depth -= 1,
            ',' if depth == 0 => {
                out.push(&sel[start..i]);
                start = i + 1;
            }
            _ => {}
        }
        if !(0..=1).contains(&depth) {
            return Err("unbalanced parentheses".into());
        }
    }
    if depth != 0 {
        return Err("unbalanced parentheses".into());
    }
    out.push(&sel[start..]);
    Ok(out)
}

/// A label name: 1-63 of `A-Z a-z 0-9 - _ .`, alphanumeric at both ends.
fn is_label_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
        && s.starts_with(|c: char| c.is_ascii_alphanumeric())
        && s.ends_with(|c: char| c.is_ascii_alphanumeric())
}

fn check_key(key: &str) -> Result<(), String> {
    let (prefix, name) = match key.split_once('/') {
        Some((p, n)) => (Some(p), n),
        None => (None, key),
    };
    let prefix_ok = prefix.is_none_or(|p| {
        !p.is_empty()
            && p.len() <= 253
            && p.split('.').all(|l| {
                is_label_name(l) && l.bytes().all(|b| b != b'_') && l == l.to_ascii_lowercase()
            })
    });
    if prefix_ok && is_label_name(name) {
        Ok(())
    } else {
        Err(format!(
            "\"{key}\" is not a label key (such as \"spark-role\" or \"sparkoperator.k8s.io/app-name\")"
        ))
    }
}

fn check_value(v: &str) -> Result<(), String> {
    if v.is_empty() || is_label_name(v) {
        Ok(())
    } else {
        Err(format!(
            "\"{v}\" is not a label value: up to 63 of A-Z a-z 0-9 - _ ."
        ))
    }
}
