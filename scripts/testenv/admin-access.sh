# Sourced by start-kube.sh and node/start-node.sh: the test clusters' two token users, admin
# (system:masters) and alice (group "devs", no rights until RBAC grants some).
#   write_admin_access TOKENS_CSV KUBECONFIG SERVER CA_FILE
# writes the apiserver's --token-auth-file and a kubeconfig with contexts "admin" (current) and "alice".
write_admin_access() {
  printf '%s\n' 'admin-token,admin,admin-uid,"system:masters"' 'alice-token,alice,alice-uid,"devs"' >"$1"
  cat >"$2" <<KC
apiVersion: v1
kind: Config
clusters:
- {name: local, cluster: {server: "$3", certificate-authority: "$4"}}
users:
- {name: admin, user: {token: admin-token}}
- {name: alice, user: {token: alice-token}}
contexts:
- {name: admin, context: {cluster: local, user: admin}}
- {name: alice, context: {cluster: local, user: alice}}
current-context: admin
KC
}
