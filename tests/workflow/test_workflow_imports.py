"""Jobs run the dfml of the checkout they belong to, not whatever the environment's editable install points at."""

from conftest import copy_project, run_snakemake

# Appended to the copy's dfml/__init__.py: each process that imports *this* dfml says which script it runs.
MARK = '\nimport os as _os, sys as _sys\nif _os.environ.get("DFML_IMPORT_MARK"):\n' \
       '    open(_os.environ["DFML_IMPORT_MARK"], "a").write(f"{_sys.argv[0]}\\n")\n'


def test_a_job_in_a_second_checkout_imports_that_checkouts_dfml(tmp_path, monkeypatch):
    # The test environment's dfml is an editable install of the repository; the copy is a second checkout sharing
    # that environment. A job importing the repository's dfml would leave no mark.
    (tmp_path / "clone").mkdir()
    project = copy_project(tmp_path / "clone")
    (project / "dfml" / "__init__.py").write_text((project / "dfml" / "__init__.py").read_text() + MARK)
    mark = tmp_path / "imported_by.txt"
    monkeypatch.setenv("DFML_IMPORT_MARK", str(mark))
    run_snakemake(project, "data/glyphs/splits.json")
    scripts = [line.rpartition("/")[2] for line in mark.read_text().split()]
    assert "prepare_data.py" in scripts, scripts
