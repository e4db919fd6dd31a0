-- Argo CD health for libvirt-operator.io/VirtualMachine, from its kstatus conditions.
local health = {status = "Progressing", message = "Waiting for the libvirt-operator agent"}
if obj.status == nil then
  return health
end
if obj.status.observedGeneration ~= nil and obj.metadata.generation ~= nil
    and obj.status.observedGeneration < obj.metadata.generation then
  health.message = "The agent has not applied generation " .. obj.metadata.generation .. " yet"
  return health
end
local conditions = {}
for _, condition in ipairs(obj.status.conditions or {}) do
  conditions[condition.type] = condition
end
local function is_true(kind)
  return conditions[kind] ~= nil and conditions[kind].status == "True"
end
local function message(kind)
  return conditions[kind] and conditions[kind].message or ""
end
local printable = obj.status.printableStatus
if printable == "CrashLoopBackOff" or printable == "Failed" then
  -- Degraded whatever the conditions say (an older agent's, say).
  health.status = "Degraded"
  health.message = is_true("Stalled") and message("Stalled") or "The VM is " .. printable
  return health
end
if obj.status.conditions == nil then
  return health
end
if is_true("Stalled") then
  health.status = "Degraded"
  health.message = message("Stalled")
elseif obj.spec ~= nil and obj.spec.paused == true and is_true("Paused") and is_true("Ready") then
  health.status = "Suspended"
  health.message = "Paused as spec.paused asks"
elseif is_true("Ready") then
  health.status = "Healthy"
  health.message = message("Ready")
else
  health.status = "Progressing"
  health.message = message("Ready")
end
return health
