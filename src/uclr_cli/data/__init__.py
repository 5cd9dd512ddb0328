"""Raw readers, the split and candidate logic, and the prepared-folder loader."""
