# Sourced by the training scripts: decay_copy FROM TO seeds run folder TO (a learning-rate decay that
# finishes run FROM) with FROM's state, unless TO already holds one: FROM's full local checkpoint, else
# its committed compact resume state, and its logs. FROM stays untouched and resumable.
decay_copy() {
  local from=$1 to=$2 state=checkpoint
  [ -f "$to/checkpoint.safetensors" ] || [ -f "$to/resume.safetensors" ] && return 0
  [ -f "$from/checkpoint.safetensors" ] || state=resume
  mkdir -p "$to" && cp "$from/$state".{safetensors,json} "$from"/train.csv "$from"/val.csv "$to"/
}
