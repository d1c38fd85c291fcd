from digin.cli import app

app(prog_name="digin")
