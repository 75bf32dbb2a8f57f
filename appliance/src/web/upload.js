// The slide page's script (see UPLOAD_JS in mod.rs). Its texts come in the user's language
// as T (script_texts in mod.rs), with {name}-style placeholders that f fills in.
(function(){
function f(s,o){return s.replace(/\{(\w+)\}/g,function(m,k){return k in o?o[k]:m;});}
var input=document.getElementById('image'),form=input.form,btn=document.getElementById('upload'),
p=document.getElementById('upload-progress'),busy=false;
form.addEventListener('submit',function(e){
 var files=input.files;if(!files||files.length===0)return;busy=true;btn.disabled=true;
 if(files.length===1){p.textContent=f(T.js_classifying_one,{name:files[0].name});return;}
 e.preventDefault();var single=document.getElementById('single_cell').checked,i=0,failed=[];
 function next(){
  if(i>=files.length){var o={ok:files.length-failed.length,n:files.length,failed:failed.join('; ')};
   p.textContent=f(failed.length?T.js_done_failed:T.js_done,o);setTimeout(function(){location.reload();},failed.length?6000:1000);return;}
  var file=files[i];p.textContent=f(T.js_classifying,{i:i+1,n:files.length,name:file.name});
  var d=new FormData();d.append('image',file);if(single)d.append('single_cell','on');
  fetch(form.action,{method:'POST',body:d,credentials:'same-origin'}).then(function(r){
   if(!r.ok)return r.text().then(function(t){var el=new DOMParser().parseFromString(t,'text/html').getElementById('error');
    failed.push(el?el.textContent:file.name+' ('+r.status+')');});
  }).catch(function(){failed.push(f(T.js_no_answer,{name:file.name}));}).then(function(){i++;next();});
 }
 next();
});
var st=document.getElementById('slide-state'),seen=st?st.textContent:null;
setInterval(function(){
 var a=document.activeElement;if(busy||(a&&/^(INPUT|SELECT|TEXTAREA)$/.test(a.tagName)&&a.type!=='submit'))return;
 fetch('/api/slide',{credentials:'same-origin'}).then(function(r){return r.json();}).then(function(s){
  var k=[s.slide_id,s.fields,s.classified,s.unidentified,s.flags.length].join('/');if(seen!==null&&k!==seen)location.reload();seen=k;
 }).catch(function(){});
},5000);
})();
