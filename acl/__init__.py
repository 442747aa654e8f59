"""Authorization: the ordered chain of rule sources a publish or subscribe is checked against."""
