# Sourced by the round-3 scripts: run_configs ROOT "COMMON FLAGS" [NAME ...] trains each
# entry "NAME FLAGS..." of the caller's `configs` array into ROOT/NAME (only the NAMEs given,
# if any), skipping runs marked done; a killed run resumes from its last epoch.
run_configs() {
  local root=$1 common=$2
  shift 2
  local wanted=" $* " config name flags
  for config in "${configs[@]}"; do
    read -r name flags <<<"$config"
    [[ $# -gt 0 && $wanted != *" $name "* ]] && continue
    [[ -f $root/$name/done ]] && continue
    # shellcheck disable=SC2086
    python -m dino_locat.training --output_dir "$root/$name" $common $flags
    touch "$root/$name/done"
  done
}
