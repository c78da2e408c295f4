{{/* Names and labels. */}}
{{- define "vsa.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "vsa.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "vsa.selectorLabels" -}}
app.kubernetes.io/name: {{ include "vsa.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "vsa.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "vsa.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{- define "vsa.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "vsa.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "vsa.configSecretName" -}}
{{- default (printf "%s-config" (include "vsa.fullname" .)) .Values.existingConfigSecret -}}
{{- end -}}

{{- define "vsa.claimName" -}}
{{- default (include "vsa.fullname" .) .Values.persistence.existingClaim -}}
{{- end -}}

{{/* Where things live in the container (the image's CMD reads /etc/vault.d/snapshot.json). */}}
{{- define "vsa.paths" -}}
config: /etc/vault.d
snapshots: /var/backups/vault
state: /var/lib/vault-snapshot-agent
secrets: /var/run/secrets/vault-snapshot-agent
{{- end -}}

{{/* Metrics are served by the long-running agent only. */}}
{{- define "vsa.metricsOn" -}}
{{- if and (eq .Values.mode "deployment") .Values.metrics.enabled -}}true{{- end -}}
{{- end -}}

{{/* A projected service-account token: jwt always, kubernetes with an audience. */}}
{{- define "vsa.projectedToken" -}}
{{- if or (eq .Values.auth.method "jwt") (and (eq .Values.auth.method "kubernetes") .Values.auth.audience) -}}true{{- end -}}
{{- end -}}

{{/* Checks no schema can express. */}}
{{- define "vsa.validate" -}}
{{- if and (ne .Values.mode "deployment") (or .Values.metrics.serviceMonitor.enabled .Values.metrics.podMonitor.enabled) -}}
{{- fail "metrics.serviceMonitor/podMonitor need mode: deployment (a CronJob's pod lives too briefly to be scraped; alert on the Job with kube-state-metrics, see contrib/deploy/alerts.yaml)" -}}
{{- end -}}
{{- if and (or .Values.metrics.serviceMonitor.enabled .Values.metrics.podMonitor.enabled) (not .Values.metrics.enabled) -}}
{{- fail "metrics.serviceMonitor/podMonitor need metrics.enabled: true" -}}
{{- end -}}
{{- if and (eq .Values.auth.method "jwt") (not .Values.auth.audience) -}}
{{- fail "auth.method jwt needs auth.audience (the projected token's audience, the role's bound_audiences)" -}}
{{- end -}}
{{- if and (has .Values.auth.method (list "kubernetes" "jwt")) (not .Values.auth.role) -}}
{{- fail (printf "auth.method %s needs auth.role" .Values.auth.method) -}}
{{- end -}}
{{- if and (eq .Values.auth.method "approle") (or (not .Values.auth.roleId) (not .Values.auth.secretIdSecret.name)) -}}
{{- fail "auth.method approle needs auth.roleId and auth.secretIdSecret.name (an existing Secret holding the secret_id)" -}}
{{- end -}}
{{- if and (eq .Values.auth.method "token") (not .Values.auth.tokenSecret.name) -}}
{{- fail "auth.method token needs auth.tokenSecret.name (an existing Secret holding the token)" -}}
{{- end -}}
{{- if and .Values.vault.tls.caSecret (not .Values.vault.tls.enabled) -}}
{{- fail "vault.tls.caSecret is set but vault.tls.enabled is false (addr would be http://)" -}}
{{- end -}}
{{- if and (not .Values.existingConfigSecret) (hasKey (.Values.config | default dict) "local_storage") (not .Values.persistence.enabled) -}}
{{- fail "config.local_storage without persistence.enabled: the snapshots would vanish with the pod (enable persistence, or use a cloud storage block)" -}}
{{- end -}}
{{- end -}}

{{/* The agent's config: the values' `config` plus what the chart knows, as JSON.
     A key set in `config` always wins. */}}
{{- define "vsa.config" -}}
{{- $p := include "vsa.paths" . | fromYaml -}}
{{- $c := mustDeepCopy (.Values.config | default dict) -}}
{{- $v := .Values.vault -}}
{{- $scheme := ternary "https" "http" $v.tls.enabled -}}
{{- $ns := default .Release.Namespace $v.namespace -}}
{{- if not (hasKey $c "addr") -}}
{{- $_ := set $c "addr" (printf "%s://%s-active.%s.svc:%d" $scheme $v.release $ns (int $v.port)) -}}
{{- end -}}
{{- if and $v.tls.caSecret (not (hasKey $c "ca_cert")) -}}
{{- $_ := set $c "ca_cert" (printf "%s/tls/%s" $p.secrets $v.tls.caKey) -}}
{{- end -}}
{{- if and $v.tls.serverName (not (hasKey $c "tls_server_name")) -}}
{{- $_ := set $c "tls_server_name" $v.tls.serverName -}}
{{- end -}}
{{- $a := .Values.auth -}}
{{- $auth := dict -}}
{{- if eq $a.method "kubernetes" -}}
{{- $_ := set $auth "vault_auth_method" "k8s" -}}
{{- $_ := set $auth "vault_auth_role" $a.role -}}
{{- if $a.audience -}}{{- $_ := set $auth "k8s_token_path" (printf "%s/token/token" $p.secrets) -}}{{- end -}}
{{- else if eq $a.method "jwt" -}}
{{- $_ := set $auth "vault_auth_method" "jwt" -}}
{{- $_ := set $auth "vault_auth_role" $a.role -}}
{{- $_ := set $auth "jwt_file" (printf "%s/token/token" $p.secrets) -}}
{{- else if eq $a.method "approle" -}}
{{- $_ := set $auth "vault_auth_method" "approle" -}}
{{- $_ := set $auth "role_id" $a.roleId -}}
{{- $_ := set $auth "secret_id_file" (printf "%s/approle/%s" $p.secrets $a.secretIdSecret.key) -}}
{{- else if eq $a.method "token" -}}
{{- $_ := set $auth "vault_auth_method" "token" -}}
{{- $_ := set $auth "token_file" (printf "%s/vault-token/%s" $p.secrets $a.tokenSecret.key) -}}
{{- end -}}
{{- if and $a.method $a.path -}}{{- $_ := set $auth "vault_auth_path" $a.path -}}{{- end -}}
{{- $c = merge $c $auth -}}
{{- if and (include "vsa.metricsOn" .) (not (hasKey $c "metrics_address")) -}}
{{- $_ := set $c "metrics_address" (printf "0.0.0.0:%d" (int .Values.metrics.port)) -}}
{{- end -}}
{{- if not (hasKey $c "status_file") -}}
{{- $_ := set $c "status_file" (printf "%s/status.json" $p.state) -}}
{{- end -}}
{{- if .Values.persistence.enabled -}}
{{- $local := mustDeepCopy (get $c "local_storage" | default dict) -}}
{{- if kindIs "map" $local -}}
{{- if not (hasKey $local "path") -}}{{- $_ := set $local "path" $p.snapshots -}}{{- end -}}
{{- $_ := set $c "local_storage" $local -}}
{{- end -}}
{{- end -}}
{{- toPrettyJson $c -}}
{{- end -}}

{{/* The pod template's spec, shared by the Deployment and the CronJob. */}}
{{- define "vsa.podSpec" -}}
{{- $p := include "vsa.paths" . | fromYaml -}}
{{- $a := .Values.auth -}}
{{- with .Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
serviceAccountName: {{ include "vsa.serviceAccountName" . }}
# The default token only where Kubernetes auth reads it; a projected token otherwise.
automountServiceAccountToken: {{ and (eq $a.method "kubernetes") (not $a.audience) }}
{{- if eq .Values.mode "cronjob" }}
restartPolicy: Never
{{- end }}
{{- with .Values.priorityClassName }}
priorityClassName: {{ . }}
{{- end }}
terminationGracePeriodSeconds: {{ .Values.terminationGracePeriodSeconds }}
securityContext:
  {{- toYaml .Values.podSecurityContext | nindent 2 }}
containers:
  - name: agent
    image: "{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}"
    imagePullPolicy: {{ .Values.image.pullPolicy }}
    # The image's ENTRYPOINT is tini -s -- python3 -u /app/vault_snapshot_agent.py:
    # args only, never command (tini reaps what an AWS credential_process leaves).
    args:
      - --config
      - {{ $p.config }}/snapshot.json
      {{- if eq .Values.mode "cronjob" }}
      - --once
      {{- end }}
      - --log-level
      - {{ .Values.logLevel }}
      - --log-format
      - {{ .Values.logFormat }}
      {{- range .Values.extraArgs }}
      - {{ . | quote }}
      {{- end }}
    {{- with .Values.extraEnv }}
    env:
      {{- toYaml . | nindent 6 }}
    {{- end }}
    {{- with .Values.envFrom }}
    envFrom:
      {{- toYaml . | nindent 6 }}
    {{- end }}
    {{- if include "vsa.metricsOn" . }}
    ports:
      - name: metrics
        containerPort: {{ .Values.metrics.port }}
        protocol: TCP
    {{- with .Values.livenessProbe }}
    livenessProbe:
      {{- toYaml . | nindent 6 }}
    {{- end }}
    {{- with .Values.readinessProbe }}
    readinessProbe:
      {{- toYaml . | nindent 6 }}
    {{- end }}
    {{- end }}
    securityContext:
      {{- toYaml .Values.securityContext | nindent 6 }}
    {{- with .Values.resources }}
    resources:
      {{- toYaml . | nindent 6 }}
    {{- end }}
    volumeMounts:
      - name: config
        mountPath: {{ $p.config }}
        readOnly: true
      - name: tmp
        mountPath: /tmp
      - name: state
        mountPath: {{ $p.state }}
      {{- if .Values.persistence.enabled }}
      - name: snapshots
        mountPath: {{ $p.snapshots }}
      {{- end }}
      {{- if include "vsa.projectedToken" . }}
      - name: vault-token
        mountPath: {{ $p.secrets }}/token
        readOnly: true
      {{- end }}
      {{- if eq $a.method "approle" }}
      - name: approle
        mountPath: {{ $p.secrets }}/approle
        readOnly: true
      {{- end }}
      {{- if eq $a.method "token" }}
      - name: token-secret
        mountPath: {{ $p.secrets }}/vault-token
        readOnly: true
      {{- end }}
      {{- if .Values.vault.tls.caSecret }}
      - name: vault-ca
        mountPath: {{ $p.secrets }}/tls
        readOnly: true
      {{- end }}
      {{- range .Values.secretMounts }}
      - name: {{ .name }}
        mountPath: {{ .mountPath }}
        readOnly: true
      {{- end }}
      {{- with .Values.extraVolumeMounts }}
      {{- toYaml . | nindent 6 }}
      {{- end }}
volumes:
  - name: config
    secret:
      secretName: {{ include "vsa.configSecretName" . }}
      defaultMode: 0440           # group-readable: fsGroup
  - name: tmp
    {{- $tmp := dict }}
    {{- with .Values.tmp.medium }}{{ $_ := set $tmp "medium" . }}{{ end }}
    {{- with .Values.tmp.sizeLimit }}{{ $_ := set $tmp "sizeLimit" . }}{{ end }}
    emptyDir: {{ toJson $tmp }}
  - name: state
    emptyDir: {}
  {{- if .Values.persistence.enabled }}
  - name: snapshots
    persistentVolumeClaim:
      claimName: {{ include "vsa.claimName" . }}
  {{- end }}
  {{- if include "vsa.projectedToken" . }}
  - name: vault-token
    projected:
      defaultMode: 0440
      sources:
        - serviceAccountToken:
            audience: {{ $a.audience | quote }}
            expirationSeconds: {{ $a.tokenExpirationSeconds }}
            path: token
  {{- end }}
  {{- if eq $a.method "approle" }}
  - name: approle
    secret:
      secretName: {{ $a.secretIdSecret.name }}
      defaultMode: 0440
      items:
        - key: {{ $a.secretIdSecret.key }}
          path: {{ $a.secretIdSecret.key }}
  {{- end }}
  {{- if eq $a.method "token" }}
  - name: token-secret
    secret:
      secretName: {{ $a.tokenSecret.name }}
      defaultMode: 0440
      items:
        - key: {{ $a.tokenSecret.key }}
          path: {{ $a.tokenSecret.key }}
  {{- end }}
  {{- if .Values.vault.tls.caSecret }}
  - name: vault-ca
    secret:
      secretName: {{ .Values.vault.tls.caSecret }}
      defaultMode: 0444
      items:
        - key: {{ .Values.vault.tls.caKey }}
          path: {{ .Values.vault.tls.caKey }}
  {{- end }}
  {{- range .Values.secretMounts }}
  - name: {{ .name }}
    secret:
      secretName: {{ .secretName }}
      defaultMode: 0440
      {{- with .items }}
      items:
        {{- toYaml . | nindent 8 }}
      {{- end }}
  {{- end }}
  {{- with .Values.extraVolumes }}
  {{- toYaml . | nindent 2 }}
  {{- end }}
{{- with .Values.nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .Values.affinity }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .Values.tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end -}}

{{/* The pod template's metadata. */}}
{{- define "vsa.podMetadata" -}}
labels:
  {{- include "vsa.selectorLabels" . | nindent 2 }}
  {{- with .Values.podLabels }}
  {{- toYaml . | nindent 2 }}
  {{- end }}
{{- if or (not .Values.existingConfigSecret) .Values.podAnnotations }}
annotations:
  {{- if not .Values.existingConfigSecret }}
  # A changed config rolls the pod (a hash: never the config itself).
  checksum/config: {{ include "vsa.config" . | sha256sum }}
  {{- end }}
  {{- with .Values.podAnnotations }}
  {{- toYaml . | nindent 2 }}
  {{- end }}
{{- end }}
{{- end -}}
